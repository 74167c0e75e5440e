"""`python -m carsvc` run in a source checkout whose extensions were never built
(the README's `pip install .` built them into site-packages only): the command
runs the installed copy, with its compiled hot paths, instead of the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carsvc._compat import NO_EXTENSIONS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(NO_EXTENSIONS, reason="CARSVC_NO_EXTENSIONS: no compiled copy to prefer")


def _copy(into: Path, *, extensions: bool, version: str) -> Path:
    skip = ["__pycache__"] if extensions else ["__pycache__", "*.so", "*.pyd"]
    shutil.copytree(ROOT / "carsvc", into / "carsvc", ignore=shutil.ignore_patterns(*skip))
    (into / "carsvc" / "_version.py").write_text(f'__version__ = "{version}"\n')
    return into


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CARSVC_NO_EXTENSIONS")}
    return {**env, **extra}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A source checkout: the package without its compiled modules."""
    return _copy(tmp_path / "checkout", extensions=False, version="0.0.0+checkout")


def test_the_installed_copy_with_extensions_runs_instead_of_the_checkout(checkout: Path, tmp_path: Path) -> None:
    installed = _copy(tmp_path / "site", extensions=True, version="0.0.0+installed")
    done = subprocess.run(
        [sys.executable, "-m", "carsvc", "version"], cwd=checkout, capture_output=True, text=True, timeout=60,
        env=_env(PYTHONPATH=str(installed)),
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "carsvc 0.0.0+installed\n", "")

    proc = subprocess.Popen(
        [sys.executable, "-m", "carsvc", "serve", "--port", "0"], cwd=checkout, stderr=subprocess.PIPE, text=True,
        env=_env(PYTHONPATH=str(installed)),
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while "listening on" not in (line := proc.stderr.readline()):
            assert line, "".join(lines)
            lines.append(line)
        assert not [line for line in lines if "not compiled" in line], lines
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_without_a_compiled_copy_the_checkout_runs(checkout: Path, tmp_path: Path) -> None:
    bare = _copy(tmp_path / "bare", extensions=False, version="0.0.0+bare")
    done = subprocess.run(
        [sys.executable, "-m", "carsvc", "version"], cwd=checkout, capture_output=True, text=True, timeout=60,
        env=_env(PYTHONPATH=str(bare), PYTHONNOUSERSITE="1"),
    )
    # The copy that would be imported instead has no extensions either.
    assert (done.returncode, done.stdout) == (0, "carsvc 0.0.0+checkout\n"), done.stderr


def test_with_no_extensions_wanted_the_checkout_runs(checkout: Path, tmp_path: Path) -> None:
    installed = _copy(tmp_path / "site", extensions=True, version="0.0.0+installed")
    done = subprocess.run(
        [sys.executable, "-m", "carsvc", "version"], cwd=checkout, capture_output=True, text=True, timeout=60,
        env=_env(PYTHONPATH=str(installed), CARSVC_NO_EXTENSIONS="1"),
    )
    assert (done.returncode, done.stdout) == (0, "carsvc 0.0.0+checkout\n"), done.stderr
