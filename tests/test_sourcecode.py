"""Lint and strict typing are part of the suite (as in uvloop and asyncpg)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The layers (docs/architecture.md): services on patterns on the domain. A
# package may not import the ones above it, nor grpc below the services.
# The domain declares the backend interface (domain/backend.py); backends
# implement it and the server picks one, so the domain never imports a backend.
FORBIDDEN_IMPORTS = {
    "carsvc/domain": ("carsvc.backends", "carsvc.patterns", "carsvc.services", "carsvc.server", "grpc"),
    "carsvc/patterns": ("carsvc.backends", "carsvc.services", "carsvc.server", "grpc"),
    "carsvc/backends": ("carsvc.patterns", "carsvc.services", "carsvc.server", "grpc"),
}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff() -> None:
    done = _run("ruff", "check", "carsvc", "tests", "scripts", "bench", "setup.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict() -> None:
    done = _run("mypy", "carsvc", "tests", "scripts", "bench")
    assert done.returncode == 0, done.stdout + done.stderr


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def test_layers_import_only_downwards() -> None:
    wrong = []
    for package, forbidden in FORBIDDEN_IMPORTS.items():
        for path in sorted(Path(ROOT, package).rglob("*.py")):
            for module in sorted(_imported_modules(path)):
                if any(module == f or module.startswith(f + ".") for f in forbidden):
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)
