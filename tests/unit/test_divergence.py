"""The large-batch fixes as pure rules: the divergence guard's verdict, clipping against the run's own
history, the warm-up that grows with the batch multiple, and the preset and callback options."""

import math

import pytest

from lightning_firecaffe.callbacks import LargeBatchScaling
from lightning_firecaffe.large_batch import (
    DivergenceRule,
    LossHistory,
    TrainingDiverged,
    clip_threshold,
    get_preset,
    warmup_for_batch,
)
from lightning_firecaffe.options import InvalidOption

# the losses of the demo run that diverged (round 4, 8x, seed 2): steps 50-61, averaged over ranks
DIVERGING = [0.86, 0.59, 0.65, 0.55, 0.68, 0.6, 0.52, 0.45, 0.55, 0.61, 1.87, 8.22]


def test_the_guard_stops_the_measured_divergence_at_its_explosion_not_before():
    history = LossHistory(DivergenceRule(factor=5, window=20, min_history=10))
    for loss in [2.3, 2.25, 2.2, 2.1, 2.0, 1.9, 1.7, 1.5, 1.3, 1.1]:  # the untrained level is ~2.05
        assert history.observe(loss) is None
    verdicts = [history.observe(loss) for loss in DIVERGING]
    assert verdicts[:-1] == [None] * (len(DIVERGING) - 1)  # 1.87 is a spike below the untrained level
    assert "8.22" in verdicts[-1] and "above the untrained level" in verdicts[-1]


def test_a_converged_runs_noisy_small_losses_are_not_divergence():
    rule = DivergenceRule(factor=5, window=20, min_history=10)
    history = [0.05] * 20
    assert rule.verdict(0.4, history, untrained=2.3) is None  # 8x the median, still far better than untrained
    assert rule.verdict(2.5, history, untrained=2.3) is not None


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_loss_is_divergence_from_the_first_step(loss):
    assert "the loss is" in DivergenceRule().verdict(loss, [], untrained=None)


def test_the_message_names_the_step_the_lr_and_what_to_change():
    err = TrainingDiverged(61, 0.0222, 8.2, "the loss is nan", "To change: callbacks.large_batch.base_lr")
    assert "step 61" in str(err) and "LR 0.0222" in str(err) and "callbacks.large_batch.base_lr" in str(err)


def test_clipping_is_relative_to_the_runs_own_recent_norms():
    norms = [3.0, 2.0, 4.0, 3.0, 2.5]
    assert clip_threshold(51.0, norms, factor=2) == 6.0  # 2 x median 3
    assert clip_threshold(5.9, norms, factor=2) is None
    assert clip_threshold(51.0, norms[:3], factor=2) is None  # too little history to judge
    assert clip_threshold(math.nan, norms, factor=2) is None


def test_warmup_grows_with_the_batch_multiple():
    assert warmup_for_batch(5, 0.5, 256, 32) == pytest.approx(5 + 0.5 * 7)
    assert warmup_for_batch(5, 0.5, 32, 32) == 5 and warmup_for_batch(5, 0.5, 16, 32) == 5
    assert warmup_for_batch(0, 2, 512, 32) == 30


def test_the_firecaffe_preset_carries_the_fixes_and_the_callback_applies_them():
    p = get_preset("firecaffe")
    assert p.clip_factor == 2 and p.decay_biases is False and p.warmup_per_multiple > 0
    cb = LargeBatchScaling(preset="firecaffe")
    assert cb.clip_factor == 2 and cb.decay_biases is False and cb.guard is True
    assert LargeBatchScaling(preset="firecaffe", clip_factor=3).clip_factor == 3


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(clip_factor=0.5), "clip_factor"),
        (dict(warmup_per_multiple=-1), "warmup_per_multiple"),
        (dict(guard="yes"), "guard"),
        (dict(guard_factor=1), "guard_factor"),
        (dict(decay_biases=0), "decay_biases"),
    ],
)
def test_bad_fix_settings_are_refused_by_name(kwargs, option):
    with pytest.raises(InvalidOption) as err:
        LargeBatchScaling(**kwargs)
    assert err.value.option == option


def test_the_histories_clipping_and_the_guard_judge_against_are_checkpointed():
    from lightning_firecaffe.large_batch import LRPlan

    cb = LargeBatchScaling(preset="firecaffe")
    cb.lr_plan, cb.base_lrs, cb.batch_layout = LRPlan(0.1, 256, 32, 100), [0.1], {"per_device": 128}
    cb._grad_norms.extend([3.0, 2.0, 51.0])
    for loss in [2.3, 2.2, 1.9]:
        cb._losses.observe(loss)
    resumed = LargeBatchScaling(preset="firecaffe")
    resumed.load_state_dict(cb.state_dict())
    assert list(resumed._grad_norms) == [3.0, 2.0, 51.0]
    assert list(resumed._losses.losses) == [2.3, 2.2, 1.9] and resumed._losses.first == [2.3, 2.2, 1.9]
    legacy = {k: v for k, v in cb.state_dict().items() if k in ("lr_plan", "base_lrs", "batch_layout")}
    resumed.load_state_dict(legacy)  # a checkpoint from before the histories: empty, not an error
    assert not resumed._grad_norms and not resumed._losses.losses
