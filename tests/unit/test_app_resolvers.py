"""The app's OmegaConf resolvers: registered by firecaffe-train's main(), never by importing a module."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from omegaconf import OmegaConf

import lightning_firecaffe
from lightning_firecaffe import app_checks, train

NAMES = sorted(app_checks.RESOLVERS)


@pytest.fixture
def no_resolvers():
    """OmegaConf's registry without the app's resolvers; put back afterwards (other tests compose configs)."""
    for name in NAMES:
        OmegaConf.clear_resolver(name)
    yield
    for name in NAMES:
        OmegaConf.clear_resolver(name)
    app_checks.register_resolvers()


def execute_afresh(module) -> None:
    """Run a module's code again as a new module (the real one stays in sys.modules, untouched)."""
    name = f"{module.__name__}_afresh"
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    fresh.__package__ = module.__package__
    sys.modules[name] = fresh
    try:
        spec.loader.exec_module(fresh)
    finally:
        del sys.modules[name]


@pytest.mark.parametrize("module", [app_checks, train, lightning_firecaffe], ids=lambda m: m.__name__)
def test_importing_registers_no_resolver(no_resolvers, module):
    execute_afresh(module)
    assert [OmegaConf.has_resolver(n) for n in NAMES] == [False] * len(NAMES)


def test_main_registers_them_before_hydra_runs_and_twice_is_harmless(no_resolvers, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "_hydra_main", lambda: seen.append([OmegaConf.has_resolver(n) for n in NAMES]))
    train.main()
    train.main()  # a second registration would raise "resolver 'run_id' is already registered"
    assert seen == [[True] * len(NAMES)] * 2
    cfg = OmegaConf.create({"batch": "${per_device_batch:64,2,2,1}", "run": "${run_id:}"})
    assert cfg.batch == 16 and cfg.run


def test_a_resolver_someone_else_registered_is_left_alone(no_resolvers):
    OmegaConf.register_new_resolver("run_id", lambda: "theirs")
    app_checks.register_resolvers()
    assert OmegaConf.create({"run": "${run_id:}"}).run == "theirs"
    assert OmegaConf.has_resolver("per_device_batch")
