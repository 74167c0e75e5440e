"""Which implementation of the hot paths to use, decided once per process.

``CARSVC_NO_EXTENSIONS`` set to any non-empty value other than ``"0"`` selects
the pure-Python twins (``carsvc.domain._overlay_py``, ``carsvc.domain._budget_py``)
even when the compiled modules are installed. Interpreters other than CPython
always use them.
"""

from __future__ import annotations

import os
import platform
from typing import Final

__all__ = ["IS_CPYTHON", "NO_EXTENSIONS", "USE_EXTENSIONS"]


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "")
    return value not in ("", "0")


NO_EXTENSIONS: Final[bool] = _env_flag("CARSVC_NO_EXTENSIONS")
IS_CPYTHON: Final[bool] = platform.python_implementation() == "CPython"
# Try the compiled modules at all? (They may still fail to import.)
USE_EXTENSIONS: Final[bool] = IS_CPYTHON and not NO_EXTENSIONS
