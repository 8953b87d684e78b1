"""Fixtures for the RMF v1 codec: ``impl`` runs a test on each twin.

The pure twin always runs; the compiled one whenever it is built, unless
``RMIOT_PURE=1`` asks for the pure twin only.  The report header (and the
terminal summary, printed by tests/conftest.py) say which ran.
"""

from __future__ import annotations

from types import ModuleType

import pytest

import rmiot.core_ext

from .support import COMPILED, KEYS, TWINS, twin_name


def twins_line() -> str:
    """What the report header says (tests/conftest.py prints it)."""
    ran = ", ".join(twin_name(m) for m in TWINS)
    built = "built" if COMPILED is not None else "NOT BUILT"
    return (
        f"rmiot.core_ext twins under test: {ran} (compiled twin {built}; "
        f"package IMPL={rmiot.core_ext.IMPL})"
    )


@pytest.fixture(scope="session", params=TWINS, ids=twin_name)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The twin under test (session scope, so hypothesis tests can take it)."""
    module: ModuleType = request.param
    return module


@pytest.fixture(scope="session")
def keys() -> dict[int, bytes]:
    """The vectors' device keys."""
    return dict(KEYS)
