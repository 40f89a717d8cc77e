"""Fabric's ``FireCaffeStrategy``: Fabric's ``DDPStrategy`` positional signature, FireCaffe's options keyword-only
and validated like the Trainer's, and its names in Fabric's registry (following the algorithm registry)."""

import dataclasses
import inspect
import pickle

import pytest
from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

import lightning_firecaffe
from lightning_firecaffe import FireCaffeOptions, InvalidOption
from lightning_firecaffe.fabric import FireCaffeStrategy
from lightning_firecaffe.strategy_options import TRAINER_ONLY

OPTIONS = {f.name for f in dataclasses.fields(FireCaffeOptions)} - set(TRAINER_ONLY)  # local SGD: the Trainer's


def positional(cls) -> list[tuple[str, object]]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(cls.__init__).parameters.values()
    return [(p.name, p.default) for p in params if p.kind in kinds][1:]


def test_positional_parameters_are_fabric_ddps_in_the_same_order_and_options_are_keyword_only():
    assert positional(FireCaffeStrategy) == positional(DDPStrategy)
    params = inspect.signature(FireCaffeStrategy.__init__).parameters.values()
    keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == OPTIONS
    assert issubclass(FireCaffeStrategy, DDPStrategy)


@pytest.mark.parametrize(
    "option, value",
    [
        ("algorithm", "butterfly"),
        ("arity", 1),
        ("chunk_bytes", 0),
        ("stall_timeout", 0),
        ("link", "fast"),
        ("auto_repetitions", 0),
        ("compression", "int8"),
        ("watchdog", "yes"),
        ("stall_action", "explode"),
        ("stall_grace", -1),
        ("stall_allowance", {"lunch": 5}),
        ("start_method", "teleport"),
    ],
)
def test_a_bad_option_raises_invalid_option_naming_it(option, value):
    with pytest.raises(InvalidOption, match=option):
        FireCaffeStrategy(**{option: value})


def test_options_are_the_trainers_options_object():
    strategy = FireCaffeStrategy(None, None, None, None, None, "gloo", algorithm="tree", compression="bf16")
    assert strategy.options == FireCaffeOptions(algorithm="tree", compression="bf16")
    assert strategy.process_group_backend == "gloo"
    pickle.loads(pickle.dumps(strategy))  # the spawn launcher pickles it


def test_fabric_accepts_the_names_and_follows_the_algorithm_registry():
    fabric = Fabric(strategy="firecaffe_spawn", accelerator="cpu", devices=2)
    assert isinstance(fabric.strategy, FireCaffeStrategy) and fabric.strategy._start_method == "spawn"
    assert Fabric(strategy="firecaffe_tree", accelerator="cpu", devices=2).strategy.algorithm == "tree"
    names = STRATEGY_REGISTRY.available_strategies()
    assert {"firecaffe", "firecaffe_spawn", "firecaffe_fork"} <= set(names)
    assert {f"firecaffe_{a}" for a in lightning_firecaffe.algorithm_names()} <= set(names)

    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_firecaffe.comm.schedules import register_algorithm, unregister_algorithm, whole_buffer

    builtin = lightning_firecaffe.algorithm_names()[0]
    register_algorithm("fabric_probe", chunking=whole_buffer, summary="a plugin")(
        lightning_firecaffe.comm.schedules.get_algorithm(builtin).build
    )
    try:
        assert "firecaffe_fabric_probe" in STRATEGY_REGISTRY and "firecaffe_fabric_probe" in StrategyRegistry
    finally:
        unregister_algorithm("fabric_probe")
    assert "firecaffe_fabric_probe" not in STRATEGY_REGISTRY and "firecaffe_fabric_probe" not in StrategyRegistry


def test_local_sgd_is_refused_naming_the_option():
    with pytest.raises(InvalidOption) as err:
        FireCaffeStrategy(model_averaging_period=4)
    assert err.value.option == "model_averaging_period" and "Trainer's" in str(err.value)


def test_a_module_set_up_without_a_process_group_gets_no_gradient_path():
    """Nobody to reduce with (Lightning's own unit tests set up a mocked DDP this way): no hook, no error."""
    from unittest import mock

    import torch

    strategy = FireCaffeStrategy(parallel_devices=[torch.device("cpu")] * 2, watchdog=False)
    with mock.patch("lightning.fabric.strategies.ddp.DistributedDataParallel") as ddp:
        wrapped = strategy.setup_module(torch.nn.Linear(2, 2))
    assert wrapped is ddp.return_value
    assert strategy.gradient_path.hook_state is None
