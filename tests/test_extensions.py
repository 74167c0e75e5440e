"""The compiled hot paths really loaded, and CARSVC_NO_EXTENSIONS really switches them off.

Without these, a broken build would pass every other test while running only
the pure-Python twins.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from carsvc import _compat
from carsvc.domain import budget, overlay

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, logging
logging.basicConfig(level=logging.WARNING, format="%(name)s:%(levelname)s:%(message)s")
{prelude}
from carsvc import _compat
from carsvc.domain import budget, overlay
print(json.dumps({{
    "no_extensions": _compat.NO_EXTENSIONS,
    "overlay": overlay.USING_EXTENSIONS,
    "budget": budget.USING_EXTENSIONS,
    "store_module": overlay.StateStore.__module__,
    "budget_module": budget.CoordinationBudget.__module__,
    "has_c_names": hasattr(overlay, "CStateStore") and hasattr(budget, "CCoordinationBudget"),
}}))
"""


def probe(env_value: str | None, prelude: str = "") -> tuple[dict[str, Any], str]:
    """Import the selectors in a fresh interpreter; return what they chose and stderr."""
    env = dict(os.environ)
    env.pop("CARSVC_NO_EXTENSIONS", None)
    if env_value is not None:
        env["CARSVC_NO_EXTENSIONS"] = env_value
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(prelude=prelude)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(proc.stdout), proc.stderr


needs_extensions = pytest.mark.skipif(
    _compat.NO_EXTENSIONS,
    reason="CARSVC_NO_EXTENSIONS is set: the compiled twins are not under test",
)


@needs_extensions
def test_compiled_modules_loaded() -> None:
    assert overlay.USING_EXTENSIONS
    assert budget.USING_EXTENSIONS
    assert overlay.StateStore is overlay.CStateStore
    assert overlay.Overlay is overlay.COverlay
    assert budget.CoordinationBudget is budget.CCoordinationBudget
    assert overlay.StateStore.__module__ == "carsvc.domain._overlay"
    assert budget.CoordinationBudget.__module__ == "carsvc.domain._budget"
    c_budget = importlib.import_module("carsvc.domain._budget")
    c_overlay = importlib.import_module("carsvc.domain._overlay")

    for module in (c_overlay, c_budget):
        assert module.__file__ is not None
        assert Path(module.__file__).suffix in (".so", ".pyd"), module.__file__


def test_pure_python_twins_are_always_exported() -> None:
    assert overlay.PyStateStore.__module__ == "carsvc.domain._overlay_py"
    assert overlay.PyOverlay.__module__ == "carsvc.domain._overlay_py"
    assert budget.PyCoordinationBudget.__module__ == "carsvc.domain._budget_py"
    if _compat.NO_EXTENSIONS:
        assert overlay.StateStore is overlay.PyStateStore
        assert budget.CoordinationBudget is budget.PyCoordinationBudget
        assert not hasattr(overlay, "CStateStore")


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_env_switch_selects_the_pure_python_twins(value: str) -> None:
    chosen, stderr = probe(value)
    assert chosen == {
        "no_extensions": True,
        "overlay": False,
        "budget": False,
        "store_module": "carsvc.domain._overlay_py",
        "budget_module": "carsvc.domain._budget_py",
        "has_c_names": False,
    }
    assert "not compiled" not in stderr  # a deliberate choice is not worth a warning


@needs_extensions
@pytest.mark.parametrize("value", [None, "", "0"])
def test_env_switch_off_selects_the_compiled_twins(value: str | None) -> None:
    chosen, stderr = probe(value)
    assert chosen == {
        "no_extensions": False,
        "overlay": True,
        "budget": True,
        "store_module": "carsvc.domain._overlay",
        "budget_module": "carsvc.domain._budget",
        "has_c_names": True,
    }
    assert stderr == ""


def test_a_missing_compiled_module_falls_back_with_one_warning() -> None:
    # sys.modules[name] = None makes "import name" raise ImportError.
    prelude = (
        "import sys\n"
        "sys.modules['carsvc.domain._overlay'] = None\n"
        "sys.modules['carsvc.domain._budget'] = None\n"
    )
    chosen, stderr = probe(None, prelude)
    assert chosen["overlay"] is False
    assert chosen["budget"] is False
    assert chosen["store_module"] == "carsvc.domain._overlay_py"
    assert chosen["budget_module"] == "carsvc.domain._budget_py"
    warnings = [line for line in stderr.splitlines() if line.startswith("carsvc:WARNING:")]
    assert len(warnings) == 2, stderr  # one per hot path, each logged once
    assert sum("carsvc.domain._overlay is not compiled" in w for w in warnings) == 1
    assert sum("carsvc.domain._budget is not compiled" in w for w in warnings) == 1
