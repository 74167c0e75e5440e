"""Lint and strict typing are part of the suite (as in uvloop and asyncpg)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff() -> None:
    done = _run("ruff", "check", "carsvc", "tests", "scripts", "bench", "setup.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict() -> None:
    done = _run("mypy", "carsvc", "tests", "scripts", "bench")
    assert done.returncode == 0, done.stdout + done.stderr
