"""Which implementation of the hot paths to use, decided once per process.

``CARSVC_NO_EXTENSIONS`` set to any non-empty value other than ``"0"`` selects
the pure-Python twins (``carsvc.domain._overlay_py``, ``carsvc.domain._budget_py``)
even when the compiled modules are installed. Interpreters other than CPython
always use them.
"""

from __future__ import annotations

import importlib.machinery
import os
import platform
import sys
from pathlib import Path
from typing import Final

__all__ = ["IS_CPYTHON", "NO_EXTENSIONS", "USE_EXTENSIONS", "installed_elsewhere"]


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "")
    return value not in ("", "0")


NO_EXTENSIONS: Final[bool] = _env_flag("CARSVC_NO_EXTENSIONS")
IS_CPYTHON: Final[bool] = platform.python_implementation() == "CPython"
# Try the compiled modules at all? (They may still fail to import.)
USE_EXTENSIONS: Final[bool] = IS_CPYTHON and not NO_EXTENSIONS


def _has_extensions(package: Path) -> bool:
    domain = package / "domain"
    return all(
        any((domain / f"{stem}{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES)
        for stem in ("_overlay", "_budget")
    )


def installed_elsewhere(package: Path) -> Path | None:
    """The copy of carsvc that `python -P -m carsvc` would import (the current
    directory not on sys.path), when `package` -- the copy imported -- has no
    compiled hot paths and that one has: `python -m carsvc` in a source checkout
    imports the checkout ahead of the copy `pip install .` built. None when
    `package` has them, when they are not wanted, or when that copy has none."""
    if not USE_EXTENSIONS or _has_extensions(package):
        return None
    package = package.resolve()
    path = [p for p in sys.path if Path(p or ".").resolve() != package.parent]
    for finder in sys.meta_path:  # in import order; editable installs add a finder of their own
        if finder is importlib.machinery.PathFinder:
            spec = importlib.machinery.PathFinder.find_spec("carsvc", path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec("carsvc", None)
        else:
            continue
        if spec is not None and spec.submodule_search_locations:
            found = Path(spec.submodule_search_locations[0]).resolve()
            return found if found != package and _has_extensions(found) else None
    return None
