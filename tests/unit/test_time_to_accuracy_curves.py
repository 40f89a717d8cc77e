"""Time to accuracy as pure logic: curves from a CSV log, first crossing of the target, medians over seeds
with seeds that never get there, the default target, speedups, and configurations made of overrides."""

import pytest

from lightning_firecaffe.bench.accuracy import (
    Configuration,
    default_configurations,
    parse_configuration,
    same_batch_rows,
)
from lightning_firecaffe.bench.time_to_accuracy import (
    Point,
    Run,
    compare,
    curve_from_csv_rows,
    default_target,
    mean_curve,
    time_to_target,
)


def curve(*pairs):
    return [Point(t, 100.0 * t, a) for t, a in pairs]


def test_curve_keeps_only_validation_rows_in_time_order():
    rows = [
        {"step": "3", "lr": "0.1", "time/train_s": "", "val/top1": ""},  # a training-step row
        {"step": "9", "time/train_s": "20.5", "time/images": "640", "val/top1": "0.5"},
        {"step": "4", "time/train_s": "10.0", "time/images": "320", "val/top1": "0.25"},
    ]
    assert curve_from_csv_rows(rows) == [Point(10.0, 320.0, 0.25), Point(20.5, 640.0, 0.5)]


def test_time_to_target_is_the_first_validation_at_or_above_it():
    c = curve((5, 0.2), (10, 0.6), (15, 0.5), (20, 0.7))
    assert time_to_target(c, 0.6) == 10  # reached exactly counts, a later dip does not matter
    assert time_to_target(c, 0.65) == 20
    assert time_to_target(c, 0.9) is None


def test_mean_curve_averages_the_kth_validation_of_the_healthy_seeds_up_to_the_last_they_all_reached():
    runs = [Run("a", 0, curve((1, 0.2), (3, 0.6), (5, 0.9))), Run("a", 1, curve((2, 0.4), (4, 0.8)))]
    runs.append(Run("a", 2, curve((1, 0.1)), diverged=True))
    assert mean_curve(runs) == [Point(1.5, 150.0, pytest.approx(0.3)), Point(3.5, 350.0, pytest.approx(0.7))]
    assert mean_curve([Run("a", 0, [], diverged=True)]) == []


def test_default_target_is_half_a_point_below_the_baselines_final_mean_without_diverged_seeds():
    runs = [Run("ddp", 0, curve((1, 0.5), (2, 0.80))), Run("ddp", 1, curve((1, 0.5), (2, 0.90)))]
    runs.append(Run("ddp", 2, curve((1, 0.1)), diverged=True))
    assert default_target(runs) == pytest.approx(0.85 - 0.005)
    with pytest.raises(ValueError, match="--target"):
        default_target([Run("ddp", 0, [])])


def test_compare_gives_speedups_against_the_baseline_and_the_same_batch_row():
    runs = [
        Run("ddp", 0, curve((10, 0.3), (40, 0.6))),
        Run("ddp", 1, curve((10, 0.3), (40, 0.62))),
        Run("big", 0, curve((5, 0.5), (10, 0.7))),
        Run("big", 1, curve((5, 0.6), (10, 0.7))),  # 0.6 alone misses 0.605 too
        Run("ddp_big", 0, curve((8, 0.4), (20, 0.7))),
        Run("ddp_big", 1, curve((8, 0.4), (20, 0.7))),
        Run("bad", 0, curve((5, 0.1)), diverged=True),
        Run("bad", 1, curve((5, 0.1)), diverged=True),
    ]
    target, rows = compare(runs, "ddp", same_batch={"big": "ddp_big"})
    assert target == pytest.approx(0.61 - 0.005)
    by = {s.config: s for s in rows}
    # the baseline reaches its own target at its end even though one seed alone ends below it
    assert by["ddp"].seed_times == [None, 40] and by["ddp"].time_to_target == 40 and by["ddp"].speedup == 1
    # the mean curve: (5 s, 0.55) misses 0.605, (10 s, 0.7) reaches it
    assert by["big"].seed_times == [10, 10] and by["big"].time_to_target == 10
    assert by["big"].speedup == pytest.approx(4)
    assert by["big"].speedup_same_batch == pytest.approx(2) and by["big"].same_batch_as == "ddp_big"
    assert by["big"].final_mean == pytest.approx(0.7) and by["big"].final_spread == 0
    assert by["bad"].diverged == [0, 1] and by["bad"].time_to_target is None and by["bad"].speedup is None
    assert by["big"].images_per_s == pytest.approx(100.0)
    assert [s.config for s in rows] == ["ddp", "big", "ddp_big", "bad"]
    target, _ = compare(runs, "ddp", target=0.9)
    assert target == 0.9
    with pytest.raises(ValueError, match="baseline"):
        compare(runs, "nope")


def test_a_configuration_is_a_name_and_overrides():
    c = parse_configuration("arity3: global_batch_size=32 strategy.algorithm=tree strategy.arity=3")
    assert c == Configuration("arity3", ("global_batch_size=32", "strategy.algorithm=tree", "strategy.arity=3"))
    assert parse_configuration("q: 'model.lr=0.1'").overrides == ("model.lr=0.1",)
    for bad in ("no colon here", ": x=1", "two words: x=1"):
        with pytest.raises(ValueError, match="name: override"):
            parse_configuration(bad)


def test_budgets_are_written_as_lightning_reads_them():
    from lightning_firecaffe.bench.accuracy import max_time

    assert max_time(30) == "00:00:00:30"
    assert max_time(900) == "00:00:15:00", "Lightning refuses '00:00:00:900'"
    assert max_time(90061) == "01:01:01:01"


def test_the_default_comparison_has_every_row_the_benchmark_promises():
    rows = {c.name: c.overrides for c in default_configurations(32)}
    assert set(rows) == {
        "ddp",
        "firecaffe",
        *(f"firecaffe_{k}x{w}" for k in (4, 8, 16) for w in ("", "_bf16")),
        "firecaffe_4x_powersgd",
        "firecaffe_4x_localsgd",
        "ddp_4x",
        "ddp_8x",
        "ddp_16x",
    }
    assert "strategy.model_averaging_period=8" in rows["firecaffe_4x_localsgd"]
    assert "strategy=ddp" in rows["ddp"] and "global_batch_size=32" in rows["ddp"]
    assert (
        "global_batch_size=512" in rows["firecaffe_16x"]
        and "callbacks.large_batch.preset=firecaffe" in rows["firecaffe_16x"]
    )
    assert "strategy.compression=bf16" in rows["firecaffe_8x_bf16"]
    # ddp at a multiple differs from firecaffe's row only by the strategy
    assert set(rows["ddp_8x"]) - set(rows["firecaffe_8x"]) == {"strategy=ddp"}
    pairs = same_batch_rows(default_configurations(32))
    assert pairs == {
        "firecaffe": "ddp",
        "firecaffe_4x": "ddp_4x",
        "firecaffe_4x_bf16": "ddp_4x",
        "firecaffe_8x": "ddp_8x",
        "firecaffe_8x_bf16": "ddp_8x",
        "firecaffe_16x": "ddp_16x",
        "firecaffe_16x_bf16": "ddp_16x",
        "firecaffe_4x_powersgd": "ddp_4x",
        "firecaffe_4x_localsgd": "ddp_4x",
    }
