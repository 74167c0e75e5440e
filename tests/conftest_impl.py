"""The hot-path implementation fixtures (a pytest plugin).

Register from tests/conftest.py with ``pytest_plugins = ["tests.conftest_impl"]``.

Every test that takes ``impl`` (or ``store_cls`` / ``overlay_cls`` /
``budget_cls``) runs twice: on the compiled twin (``[c]``) and on the
pure-Python twin (``[py]``). The ``[c]`` run is skipped only when
``CARSVC_NO_EXTENSIONS`` is set; otherwise a compiled module that does not
import is a test failure, never a silent fallback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from carsvc._compat import NO_EXTENSIONS

NO_EXTENSIONS_REASON = "CARSVC_NO_EXTENSIONS is set: the compiled twins are not under test"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "c_extension: runs against the compiled (Cython) hot-path twins"
    )


@dataclass(frozen=True)
class Implementation:
    """One implementation of both hot paths: ``tag`` is "c" or "py"."""

    tag: str

    def __str__(self) -> str:
        return self.tag

    @property
    def is_pure_python(self) -> bool:
        return self.tag == "py"

    def _module(self, stem: str) -> ModuleType:
        name = f"carsvc.domain.{stem}_py" if self.is_pure_python else f"carsvc.domain.{stem}"
        return importlib.import_module(name)

    @property
    def overlay_module(self) -> ModuleType:
        return self._module("_overlay")

    @property
    def budget_module(self) -> ModuleType:
        return self._module("_budget")

    @property
    def StateStore(self) -> Any:
        return self.overlay_module.StateStore

    @property
    def Overlay(self) -> Any:
        return self.overlay_module.Overlay

    @property
    def StateTransition(self) -> Any:
        return self.overlay_module.StateTransition

    @property
    def CoordinationBudget(self) -> Any:
        return self.budget_module.CoordinationBudget


C_IMPL = Implementation("c")
PY_IMPL = Implementation("py")


def _load(implementation: Implementation) -> Implementation:
    if implementation.is_pure_python:
        return implementation
    if NO_EXTENSIONS:
        pytest.skip(NO_EXTENSIONS_REASON)
    try:
        implementation.overlay_module  # noqa: B018 - import both now, fail loudly
        implementation.budget_module  # noqa: B018
    except ImportError as exc:
        pytest.fail(
            f"the compiled hot paths did not import ({exc}); build them with "
            "`pip install -e .` or `python setup.py build_ext --inplace`, or set "
            "CARSVC_NO_EXTENSIONS=1 to test the pure-Python twins only",
            pytrace=False,
        )
    return implementation


@pytest.fixture(
    scope="session",
    params=[pytest.param(C_IMPL, marks=pytest.mark.c_extension), PY_IMPL],
    ids=str,
)
def impl(request: pytest.FixtureRequest) -> Implementation:
    """Each hot-path implementation in turn."""
    return _load(request.param)


@pytest.fixture(scope="session")
def c_impl() -> Implementation:
    """The compiled twin (for differential tests)."""
    return _load(C_IMPL)


@pytest.fixture(scope="session")
def py_impl() -> Implementation:
    """The pure-Python twin (for differential tests)."""
    return PY_IMPL


@pytest.fixture
def store_cls(impl: Implementation) -> Any:
    return impl.StateStore


@pytest.fixture
def overlay_cls(impl: Implementation) -> Any:
    return impl.Overlay


@pytest.fixture
def budget_cls(impl: Implementation) -> Any:
    return impl.CoordinationBudget
