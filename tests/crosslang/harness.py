"""Real processes for the cross-language tests: a sidecar (`python -m carsvc serve`) and the
example programs of clients/ (built by clients/build.sh) in Go, TypeScript, Rust and Python."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from carsvc.client import Client

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients"
T = TypeVar("T")

_NODE = "node"
_PROGRAMS: dict[tuple[str, str], list[str]] = {
    ("go", "worker"): [str(CLIENTS / "go/bin/summarizer-worker")],
    ("go", "mapreduce"): [str(CLIENTS / "go/bin/mapreduce-client")],
    ("ts", "worker"): [_NODE, str(CLIENTS / "ts/dist/examples/summarizer-worker.js")],
    ("ts", "mapreduce"): [_NODE, str(CLIENTS / "ts/dist/examples/mapreduce-client.js")],
    ("ts", "approve"): [_NODE, str(CLIENTS / "ts/dist/examples/approve-client.js")],
    ("rust", "worker"): [str(CLIENTS / "rust/target/debug/examples/summarizer_worker")],
    ("rust", "mapreduce"): [str(CLIENTS / "rust/target/debug/examples/mapreduce_client")],
    ("python", "worker"): [sys.executable, str(CLIENTS / "python/summarizer_worker.py")],
    ("python", "mapreduce"): [sys.executable, str(CLIENTS / "python/mapreduce_client.py")],
}


def program(lang: str, name: str) -> list[str]:
    """The command line of an example program; fails (never skips) when it was not built."""
    cmd = _PROGRAMS[(lang, name)]
    if not Path(cmd[-1]).exists():
        pytest.fail(f"{cmd[-1]} is missing: run `bash clients/build.sh` first")
    return list(cmd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Process:
    """A child process whose stdout and stderr go to a log file that tests poll."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0, *, count: int = 1) -> list[re.Match[str]]:
        """Waits until `pattern` matched `count` lines of the log; returns the matches."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            found = list(regex.finditer(self.text()))
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before /{pattern}/:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no /{pattern}/ x{count} within {timeout}s:\n{self.text()}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: the process dies mid-whatever, as a crash would."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._file.close()


class Sidecar:
    """`python -m carsvc serve` on a fixed loopback port (so it can be restarted on it)."""

    # Fast heartbeats so a dead worker is noticed quickly; short grace on SIGTERM.
    ENV = {
        "CARSVC_HEARTBEAT_INTERVAL_MS": "300",
        "CARSVC_SHUTDOWN_GRACE_S": "2",
        "CARSVC_UNPLACED_TIMEOUT_S": "30",
        "CARSVC_LOG_LEVEL": "INFO",
    }

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**self.ENV, **(env or {})}
        self.starts = 0
        self.process: Process | None = None

    def start(self) -> None:
        self.starts += 1
        cmd = [sys.executable, "-m", "carsvc", "serve", "--port", str(self.port)]
        self.process = Process(f"sidecar#{self.starts}", cmd, self.tmp / f"sidecar-{self.starts}.log", self.env)
        self.process.wait_for(r"carsvc listening on", timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.signal(sig)
            self.process.proc.wait(20)
            self.process.stop()


class Cluster:
    """The processes of one test; everything is stopped at the end."""

    def __init__(self, tmp: Path, sidecar: Sidecar) -> None:
        self.tmp = tmp
        self.sidecar = sidecar
        self.processes: list[Process] = []

    def worker(self, lang: str, worker_id: str, agents: str, *, sleep_ms: int = 0, max_in_flight: int = 4) -> Process:
        """Starts an example worker and waits until the sidecar welcomed it."""
        cmd = [
            *program(lang, "worker"),
            "--target", self.sidecar.address, "--worker-id", worker_id, "--agents", agents,
            "--sleep-ms", str(sleep_ms), "--max-in-flight", str(max_in_flight),
        ]
        proc = Process(worker_id, cmd, self.tmp / f"{worker_id}.log")
        self.processes.append(proc)
        proc.wait_for(rf"^ready {re.escape(worker_id)} ", timeout=30)
        return proc

    def client(self, lang: str, name: str, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Runs an example client with --json to the end; returns its JSON object."""
        cmd = [*program(lang, name), "--target", self.sidecar.address, "--json", *args]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        assert lines, f"{lang} {name} printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def stop_all(self) -> None:
        for proc in self.processes:
            proc.stop()


@contextmanager
def cluster(tmp: Path, env: dict[str, str] | None = None) -> Iterator[Cluster]:
    sidecar = Sidecar(tmp, env)
    sidecar.start()
    c = Cluster(tmp, sidecar)
    try:
        yield c
    finally:
        c.stop_all()
        sidecar.stop(signal.SIGKILL)


def with_client(address: str, fn: Callable[[Client], Awaitable[T]]) -> T:
    """Runs `fn` with a Python client of the sidecar (the test's own view of the run)."""

    async def go() -> T:
        async with Client(address) as client:
            return await fn(client)

    return asyncio.run(go())


async def events_of(client: Client, run_id: str) -> list[Any]:
    return [event async for event in client.watch(run_id)]
