"""FireCaffeStrategy's construction: options checked by the constructor, DDPStrategy's positional
signature, the names it registers. In-process, nothing is launched."""

import importlib
from datetime import timedelta

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

import lightning_firecaffe
from lightning_firecaffe import FireCaffeStrategy, InvalidOption, algorithm_names


@pytest.mark.parametrize(
    "kwargs, option, allowed",
    [
        ({"algorithm": "butterfly"}, "algorithm", ", ".join(("auto", *algorithm_names()))),
        ({"arity": 1}, "arity", ">= 2"),
        ({"arity": 2.5}, "arity", ">= 2"),
        ({"chunk_bytes": 0}, "chunk_bytes", "positive"),
        ({"chunk_bytes": -5}, "chunk_bytes", "positive"),
        ({"stall_timeout": 0}, "stall_timeout", "positive"),
        ({"stall_timeout": -1.0}, "stall_timeout", "positive"),
        ({"stall_timeout": float("inf")}, "stall_timeout", "finite"),
        ({"ddp_comm_hook": lambda s, b: None}, "ddp_comm_hook", "own comm hook"),
        ({"link": "guess"}, "link", "'measure'"),
        ({"start_method": "thread"}, "start_method", "popen, spawn, fork, forkserver"),
        ({"compression": "int8"}, "compression", "None, 'bf16', 'fp16', 'powersgd'"),
        ({"compression": 16}, "compression", "None, 'bf16', 'fp16'"),
        ({"compression_error_feedback": True}, "compression_error_feedback", "'bf16', 'fp16'"),
        ({"compression": "bf16", "compression_error_feedback": "yes"}, "compression_error_feedback", "True or False"),
        (
            {"compression": "bf16", "compression_error_feedback": True, "algorithm": "native"},
            "compression_error_feedback",
            "adds in 16 bits",
        ),
        ({"compression": "powersgd", "powersgd_rank": 0}, "powersgd_rank", "integer >= 1"),
        ({"compression": "powersgd", "powersgd_rank": 2.5}, "powersgd_rank", "integer >= 1"),
        ({"compression": "powersgd", "powersgd_start_step": -1}, "powersgd_start_step", ">= 0"),
        ({"compression": "powersgd", "powersgd_min_compression_rate": 0}, "powersgd_min_compression_rate", "positive"),
        ({"compression": "powersgd", "powersgd_wire": "fp16"}, "powersgd_wire", "use 'bf16'"),
        ({"compression": "powersgd", "powersgd_wire": "int8"}, "powersgd_wire", "None or 'bf16'"),
        ({"compression": "bf16", "powersgd_rank": 4}, "powersgd_rank", "only with compression='powersgd'"),
        ({"compression": "powersgd", "compression_error_feedback": True}, "compression_error_feedback", "always"),
        ({"model_averaging_period": 0}, "model_averaging_period", "integer >= 1"),
        ({"model_averaging_period": 2.0}, "model_averaging_period", "integer >= 1"),
        ({"model_averaging_period": 4, "averaging_start_step": 0}, "averaging_start_step", "integer >= 1"),
        ({"model_averaging_period": 4, "averaging_wire": "fp16"}, "averaging_wire", "use 'bf16'"),
        ({"model_averaging_period": 4, "averaging_wire": "int8"}, "averaging_wire", "None or 'bf16'"),
        ({"averaging_wire": "bf16"}, "averaging_wire", "without model_averaging_period"),
        ({"model_averaging_period": 4, "compression": "bf16"}, "compression", "cannot be combined"),
    ],
)
def test_bad_options_raise_naming_option_and_allowed_values(kwargs, option, allowed):
    with pytest.raises(InvalidOption) as err:
        FireCaffeStrategy(**kwargs)
    assert err.value.option == option and allowed in str(err.value)
    assert err.value.under("strategy").startswith(f"strategy.{option}=")


def _positional_arguments():
    """One non-default value for each of DDPStrategy's positional parameters, in DDPStrategy's order."""
    return (
        CPUAccelerator(),
        [torch.device("cpu")] * 2,
        LightningEnvironment(),
        TorchCheckpointIO(),
        Precision(),
        None,  # ddp_comm_state (FireCaffe installs its own hook)
        None,  # ddp_comm_hook
        lambda hook: hook,  # ddp_comm_wrapper
        4,  # model_averaging_period
        "gloo",
        timedelta(seconds=77),
        "fork",
    )


ATTRIBUTES = (
    "accelerator",
    "parallel_devices",
    "cluster_environment",
    "checkpoint_io",
    "precision_plugin",
    "_ddp_comm_state",
    "_ddp_comm_hook",
    "_ddp_comm_wrapper",
    "_model_averaging_period",
    "_process_group_backend",
    "_timeout",
    "_start_method",
)


@pytest.mark.parametrize("count", range(1, 13))
def test_positional_arguments_mean_what_they_mean_for_ddp(count):
    """The first ``count`` positional arguments land where DDPStrategy puts them; the rest keep defaults
    of the same kind."""
    args = _positional_arguments()[:count]
    ours, theirs = FireCaffeStrategy(*args), DDPStrategy(*args)
    for position, attribute in enumerate(ATTRIBUTES):
        mine, reference = getattr(ours, attribute), getattr(theirs, attribute)
        if position < count:
            assert mine is args[position] or mine == args[position] == reference, attribute
        else:
            assert type(mine) is type(reference), attribute


def test_an_accelerator_as_first_argument_is_the_accelerator():
    """Lightning's own tests call ``DDPStrategy(TestAccelerator())``; FireCaffe's options are keyword-only."""
    accelerator = CPUAccelerator()
    assert FireCaffeStrategy(accelerator).accelerator is accelerator
    with pytest.raises(TypeError):
        FireCaffeStrategy(None, None, None, None, None, None, None, None, None, None, None, "popen", "tree")


def test_registered_names_resolve_and_import_is_idempotent():
    importlib.reload(lightning_firecaffe)  # a second registration must not raise
    for name, start in [("firecaffe", "popen"), ("firecaffe_spawn", "spawn"), ("firecaffe_fork", "fork")]:
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, FireCaffeStrategy) and strategy._start_method == start
    for algorithm in algorithm_names():
        assert StrategyRegistry.get(f"firecaffe_{algorithm}").algorithm == algorithm
    assert FireCaffeStrategy(bucket_cap_mb=1, gradient_as_bucket_view=True)._ddp_kwargs["bucket_cap_mb"] == 1


def test_trainer_accepts_the_name():
    trainer = Trainer(strategy="firecaffe", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FireCaffeStrategy)
    assert trainer.strategy.algorithm == "auto"
