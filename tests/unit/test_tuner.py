"""The measured auto's bookkeeping, without processes: trial order, the same choice on every rank from
MAX-reduced times, the margin a schedule needs over the backend's all-reduce, fallbacks, restore, fit."""

import math

import pytest

from lightning_firecaffe.comm.cost_model import LinkModel, predict, rank_algorithms
from lightning_firecaffe.comm.tuner import AutoTuner, _features, fit_link

LINK = LinkModel.from_gbit(1, latency_us=100)


def tuner(**kw) -> AutoTuner:
    return AutoTuner(world_size=4, link=LINK, fallback=lambda n: "ring", **kw)


def tune(t: AutoTuner, nbytes: int, seconds: dict[str, float], ranks_slowdown=1.0) -> str:
    """Run every trial of one bucket size with the given times; the exchange multiplies by the slowest rank."""
    while t.choices().get(nbytes) is None:
        name = t.algorithm_for(nbytes)
        t.record(nbytes, name, seconds.get(name, 1.0))
        t.exchange(lambda mine: [x * ranks_slowdown for x in mine])
    return t.choices()[nbytes]


def test_candidates_are_the_models_best_few_plus_native():
    candidates = tuner().candidates_for(25_000_000)
    assert candidates[-1] == "native" and 2 <= len(candidates) <= 4
    ranked = [a for a, _ in rank_algorithms(25_000_000, 4, LINK)]
    assert list(candidates[:-1]) == [a for a in ranked if a != "native"][: len(candidates) - 1]


def test_trials_run_round_robin_and_the_fastest_wins():
    t = tuner(repetitions=2)
    nbytes = 64_000
    order = []
    while t.sizes.get(nbytes) is None or not t.sizes[nbytes].measured:
        name = t.algorithm_for(nbytes)
        order.append(name)
        t.record(nbytes, name, 0.001)
    k = len(t.sizes[nbytes].candidates)
    assert order[:k] == order[k:] == list(t.sizes[nbytes].candidates), "round-robin, each candidate twice"
    times = {name: 0.010 for name in t.sizes[nbytes].candidates} | {"tree": 0.002}
    t2 = tuner()
    assert "tree" in t2.candidates_for(nbytes)
    assert tune(t2, nbytes, times) == "tree"
    row = next(r for r in t2.report() if r["bytes"] == nbytes)
    assert row["algorithm"] == "tree" and row["measured_ms"] == pytest.approx(2.0) and row["runner_up"]


def test_a_schedule_must_beat_native_by_the_margin():
    nbytes = 25_000_000
    candidates = tuner().candidates_for(nbytes)
    almost = {name: 0.50 for name in candidates} | {"native": 0.50, candidates[0]: 0.47}  # 6 % faster
    kept = tuner()
    assert tune(kept, nbytes, almost) == "native"
    row = next(r for r in kept.report() if r["bytes"] == nbytes)
    assert row["runner_up"] == candidates[0], "the runner-up is the best of the others, not the choice again"
    clearly = {name: 0.50 for name in candidates} | {"native": 0.50, candidates[0]: 0.30}  # 40 % faster
    assert tune(tuner(), nbytes, clearly) == candidates[0]


def test_every_rank_chooses_alike_from_the_slowest_ranks_times():
    """Two ranks measure differently; the exchange gives both the element-wise maximum."""
    nbytes = 1_000_000
    a, b = tuner(), tuner()
    names = a.candidates_for(nbytes)
    fast_here = {n: 0.01 * (i + 1) for i, n in enumerate(names)}
    fast_there = {n: 0.01 * (len(names) - i) for i, n in enumerate(names)}
    for _ in range(len(names) * 2):
        for t, times in ((a, fast_here), (b, fast_there)):
            name = t.algorithm_for(nbytes)
            t.record(nbytes, name, times[name])
    worst = [max(fast_here[n], fast_there[n]) for n in names]
    assert a.exchange(lambda mine: worst) == b.exchange(lambda mine: worst)


def test_an_invalid_measurement_falls_back_to_the_model():
    t = tuner()
    nbytes = 1_000_000
    assert tune(t, nbytes, {}, ranks_slowdown=math.inf) == "ring"


def test_restored_choices_are_used_without_trials():
    t = AutoTuner.restored({1_000_000: "tree"}, world_size=4, link=LINK, fallback=lambda n: "ring")
    assert t.algorithm_for(1_000_000) == "tree" and not t.ready_to_exchange()
    assert t.sizes[1_000_000].next_trial == 0


def test_the_fit_recovers_the_link_that_produced_the_times():
    truth = LinkModel(latency_s=200e-6, bandwidth_Bps=1e8)
    rows = []
    for name in ("ring", "tree", "pipelined_tree"):
        for nbytes in (64_000, 1_000_000, 25_000_000):
            rounds, load = _features(name, nbytes, 4, truth, 2, 1 << 20)
            rows.append((rounds, load, predict(name, nbytes, 4, truth)))
    fitted, error = fit_link(rows, truth)
    assert fitted.latency_s == pytest.approx(200e-6, rel=1e-6) and fitted.bandwidth_Bps == pytest.approx(1e8, rel=1e-6)
    assert error < 1e-9
