"""gRPC at exit: a channel or server a test never closes keeps gRPC's core
initialized, and the interpreter's exit then waits for it and prints
`E0000 ... grpc_wait_for_shutdown_with_timeout() timed out`. tests/conftest.py
tracks every channel and server the tests open and fails the run, naming the
test, when one is left open; the suite itself leaves none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LEAKY = '''
import grpc

async def test_closes_its_channel():
    async with grpc.aio.insecure_channel("127.0.0.1:1"):
        pass

async def test_forgets_its_channel():
    grpc.aio.insecure_channel("127.0.0.1:1")

async def test_forgets_its_server():
    grpc.aio.server()
'''


def test_a_channel_or_server_left_open_fails_the_run_naming_the_test(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), "-c", str(ROOT / "pyproject.toml"), str(tmp_path / "test_leaky.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "3 passed" in done.stdout
    assert "gRPC objects the tests never closed" in done.stdout
    assert "channel opened by test_leaky.py::test_forgets_its_channel" in done.stdout
    assert "server opened by test_leaky.py::test_forgets_its_server" in done.stdout
    assert "test_closes_its_channel" not in done.stdout.split("never closed")[1]
