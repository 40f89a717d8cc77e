"""Skip a test whose environment is missing, or fail it where CI says that environment must be there.

The SLURM, emulated-cluster and watchdog-on-a-network tests need root, network namespaces, ``tc``, SLURM
and munge. On a laptop they skip with the reason; in CI a skip would hide a broken install or a lost
capability behind one letter in the summary. ``FIRECAFFE_REQUIRE_CLUSTER=1`` (set by ``.ci/run``) turns
every such skip into a failure with the same reason. Every test with such a prerequisite goes through
:func:`missing` (in a test or fixture), :func:`needs` (a marker) or :func:`import_or_missing`.

Also a pytest plugin (``tests/conftest.py`` loads it): it applies the :func:`needs` marker.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NoReturn

ENV_VAR = "FIRECAFFE_REQUIRE_CLUSTER"
MARKER = "firecaffe_needs"


def cluster_required(environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``FIRECAFFE_REQUIRE_CLUSTER`` is set to anything but empty or ``0``."""
    return environ.get(ENV_VAR, "").strip() not in ("", "0")


def verdict(ok: bool, reason: str, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """``("run", "")``, ``("skip", reason)`` or ``("fail", reason + why it fails)``: the pure decision."""
    if ok:
        return "run", ""
    if cluster_required(environ):
        return "fail", f"{reason} ({ENV_VAR}=1: this environment must run the test, not skip it)"
    return "skip", reason


def missing(reason: str) -> NoReturn:
    """The environment lacks what the test needs: skip with ``reason``, or fail with it when required."""
    import pytest

    action, message = verdict(False, reason)
    if action == "fail":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def import_or_missing(module: str, reason: str) -> ModuleType:
    """``pytest.importorskip`` that fails when required."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(reason)


def needs(ok: bool, reason: str) -> Any:
    """A marker (for a test, a class or ``pytestmark``): the test runs if ``ok``, else :func:`missing`."""
    import pytest

    return getattr(pytest.mark, MARKER)(ok, reason=reason)


# ---------------------------------------------------------------------------------------------- the plugin
def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", f"{MARKER}(ok, reason): run if ok, else skip (fail if {ENV_VAR}=1)")


def pytest_runtest_setup(item: Any) -> None:
    for mark in item.iter_markers(MARKER):
        if not mark.args[0]:
            missing(mark.kwargs["reason"])
