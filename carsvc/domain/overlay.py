"""State store and overlays: the compiled twin when available, else pure Python.

Both implementations are importable by name: ``PyStateStore`` / ``PyOverlay``
always, ``CStateStore`` / ``COverlay`` when the extension is compiled.
``USING_EXTENSIONS`` says which one ``StateStore`` / ``Overlay`` are. The type
checker always reads the annotated pure-Python module, so the compiled module
needs no stub. See docs/hot-paths.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from carsvc._compat import USE_EXTENSIONS
from carsvc.domain._overlay_py import Overlay as PyOverlay
from carsvc.domain._overlay_py import StateStore as PyStateStore
from carsvc.domain._overlay_py import StateTransition as PyStateTransition

__all__ = [
    "USING_EXTENSIONS",
    "Overlay",
    "PyOverlay",
    "PyStateStore",
    "PyStateTransition",
    "StateStore",
    "StateTransition",
]

USING_EXTENSIONS: bool

if TYPE_CHECKING or not USE_EXTENSIONS:
    from carsvc.domain._overlay_py import Overlay, StateStore, StateTransition

    USING_EXTENSIONS = False
else:
    try:
        from carsvc.domain._overlay import Overlay, StateStore, StateTransition
    except ImportError as exc:
        logging.getLogger("carsvc").warning(
            "carsvc.domain._overlay is not compiled (%s); using the pure-Python "
            "state overlay. Set CARSVC_NO_EXTENSIONS=1 to silence this.",
            exc,
        )
        from carsvc.domain._overlay_py import Overlay, StateStore, StateTransition

        USING_EXTENSIONS = False
    else:
        COverlay = Overlay
        CStateStore = StateStore
        CStateTransition = StateTransition
        __all__ += ["COverlay", "CStateStore", "CStateTransition"]
        USING_EXTENSIONS = True

if TYPE_CHECKING:
    # Only for the type checker: both twins have the same API.
    COverlay = PyOverlay
    CStateStore = PyStateStore
    CStateTransition = PyStateTransition
