"""FIRECAFFE_REQUIRE_CLUSTER: a test whose cluster environment is missing skips, or fails in CI."""

from __future__ import annotations

import pytest

from lightning_firecaffe.testing.required import ENV_VAR, cluster_required, verdict

pytest_plugins = ["pytester"]


@pytest.mark.parametrize(("value", "required"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_the_switch(value, required):
    assert cluster_required({} if value is None else {ENV_VAR: value}) is required


def test_verdict_keeps_the_reason():
    assert verdict(True, "no tc", {ENV_VAR: "1"}) == ("run", "")
    assert verdict(False, "no tc", {}) == ("skip", "no tc")
    action, message = verdict(False, "no tc", {ENV_VAR: "1"})
    assert action == "fail" and message.startswith("no tc") and ENV_VAR in message


# Every way a test can meet a missing environment: a marker on the module, one on a test, a call in a fixture,
# a call in the test, a missing plugin package; and a marker whose requirement holds.
SUITE = """
import pytest
from lightning_firecaffe.testing.required import import_or_missing, missing, needs

pytestmark = needs(True, "never shown")

@pytest.fixture
def slurm():
    missing("SLURM binaries missing: munged")

@needs(False, "the emulated cluster needs root")
def test_marker():
    pass

def test_fixture(slurm):
    pass

def test_call():
    missing("no tc on PATH")

def test_import():
    import_or_missing("no_such_module_for_this_test", "hydra-submitit-launcher is not installed")

@needs(True, "never shown")
def test_runs():
    pass
"""
REASONS = ("the emulated cluster needs root", "SLURM binaries missing: munged", "no tc on PATH", "hydra-submitit")


def run_suite(pytester, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    pytester.makepyfile(test_suite=SUITE)
    return pytester.runpytest_inprocess("-p", "lightning_firecaffe.testing.required", "-rsfE")


@pytest.mark.parametrize("value", [None, "0"])
def test_without_the_switch_they_skip_with_the_reason(pytester, monkeypatch, value):
    result = run_suite(pytester, monkeypatch, value)
    result.assert_outcomes(passed=1, skipped=4)
    out = result.stdout.str()
    assert all(reason in out for reason in REASONS) and "never shown" not in out


def test_with_the_switch_each_fails_with_the_same_reason(pytester, monkeypatch):
    result = run_suite(pytester, monkeypatch, "1")
    result.assert_outcomes(passed=1, failed=2, errors=2)  # a marker or fixture fails the setup: an error
    assert result.ret != 0
    out = result.stdout.str()
    assert all(reason in out for reason in REASONS) and out.count(f"{ENV_VAR}=1") >= 4
