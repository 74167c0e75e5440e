"""Cross-language tests run only when asked for: `pytest -m crosslang tests/crosslang`
(clients/ci.sh builds the Go, TypeScript and Rust programs first). Without `-m crosslang`
they are deselected, so the default `pytest` run needs no Go, Node.js or Rust build."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "crosslang" in (config.getoption("markexpr", "") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("crosslang") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("crosslang") is None]
