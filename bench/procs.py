"""Sidecar and worker processes for the benchmark scenarios.

Every scenario runs the sidecar and its workers as separate processes on
loopback, so the numbers include the process boundary a user pays for. Children
are killed when the context exits, whatever happened, and they also exit on
their own when their parent goes away (the worker reads stdin until EOF).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on [^:]+:(\d+)")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        # After the ")" that ends the command name, utime and stime are fields 11 and 12.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A child process with its stderr drained on a thread (so it never blocks)."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, name: str = "") -> None:
        self.args = list(args)
        self.name = name or " ".join(self.args[2:4])
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()

    def _drain(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                del self.lines[:-200]
                self._seen.notify_all()

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._seen:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-20:])
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {regex.pattern!r}:\n{tail}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {regex.pattern!r} from {self.name} within {timeout}s")
                self._seen.wait(min(left, 0.2))

    def rss_bytes(self) -> int:
        """Resident set size now, from /proc (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Sidecar(Child):
    """`carsvc serve --port 0` on loopback; `address` once it listens."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "carsvc",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "INFO",
                *extra,
            ],
            env=env,
        )
        port = self.wait_for(_LISTENING).group(1)
        self.address = f"127.0.0.1:{port}"


class WorkerProcess(Child):
    """`python -m bench.worker ADDRESS ...`: the benchmark's no-op agents."""

    def __init__(
        self, address: str, *, worker_id: str, max_in_flight: int, connections: int = 1, ready_timeout: float = 30.0
    ) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "bench.worker",
                address,
                "--worker-id",
                worker_id,
                "--max-in-flight",
                str(max_in_flight),
                "--connections",
                str(connections),
            ]
        )
        self.wait_for("^ready$", ready_timeout)


@contextlib.contextmanager
def cluster(
    workers: int, *, max_in_flight: int, sidecar_args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[tuple[Sidecar, list[WorkerProcess]]]:
    """A sidecar and `workers` worker processes, all stopped on exit."""
    children: list[Child] = []
    try:
        sidecar = Sidecar(*sidecar_args, env=env)
        children.append(sidecar)
        procs = []
        for i in range(workers):
            proc = WorkerProcess(sidecar.address, worker_id=f"bench-{i}", max_in_flight=max_in_flight)
            children.append(proc)
            procs.append(proc)
        yield sidecar, procs
    finally:
        for child in reversed(children):
            child.stop()


# -- the Redis backend -------------------------------------------------------------------

REDIS_SERVER = "/usr/bin/redis-server"  # Debian's redis-server package


class RedisUnavailable(RuntimeError):
    """No redis-server to run the Redis scenarios with."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_path() -> str:
    found = shutil.which("redis-server") or REDIS_SERVER
    if not Path(found).exists():
        raise RedisUnavailable(
            "the Redis scenarios need redis-server (Debian: apt-get install redis-server), "
            "or leave them out with --backends embedded"
        )
    return found


class RedisServer(Child):
    """redis-server on a free loopback port in its own temp dir, configured as
    docs/operations.md recommends (AOF with appendfsync everysec, no RDB
    snapshots); `url` once it accepts connections, its files removed on stop."""

    def __init__(self) -> None:
        path = redis_server_path()
        self._dir = tempfile.TemporaryDirectory(prefix="carsvc-bench-redis-")
        for attempt in range(5):  # another process may take the free port first
            self.port = free_port()
            super().__init__(
                [
                    path,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    self._dir.name,
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "notice",
                ],
                name=f"redis-server on port {self.port}",
            )
            try:
                self.wait_for("Ready to accept connections", 15)
                break
            except (RuntimeError, TimeoutError):
                Child.stop(self)
                if attempt == 4 or not any("in use" in line for line in self.lines):
                    self._dir.cleanup()
                    raise
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        super().stop()
        self._dir.cleanup()  # idempotent


@dataclass(frozen=True)
class Backend:
    """Where a scenario's sidecar keeps its runs: the embedded default
    (replicas 0), or a Redis with 1 or 2 replicas. With 2, the workers connect
    to replica A and the client to replica B, so every agent crosses replicas."""

    replicas: int = 0

    @property
    def name(self) -> str:
        return f"redis{self.replicas}" if self.replicas else "embedded"

    @property
    def key(self) -> str:
        """The suffix of a metric's key ("" for the embedded backend, whose keys predate the others)."""
        return f"_redis{self.replicas}" if self.replicas else ""

    @property
    def label(self) -> str:
        if not self.replicas:
            return ""
        if self.replicas == 1:
            return ", Redis 1 replica"
        return f", Redis {self.replicas} replicas"


EMBEDDED = Backend(0)
BACKENDS = {b.name: b for b in (EMBEDDED, Backend(1), Backend(2))}


class Deployment:
    """One scenario's processes: the sidecar replicas, the worker processes
    (connected to the first replica), the Redis server if any, and the address
    the client uses (the last replica)."""

    def __init__(self, sidecars: list[Sidecar], workers: list[WorkerProcess], redis: RedisServer | None) -> None:
        self.sidecars = sidecars
        self.workers = workers
        self.redis = redis
        self.address = sidecars[-1].address

    def sidecar_cpu_seconds(self) -> float:
        return sum(s.cpu_seconds() for s in self.sidecars)

    def redis_cpu_seconds(self) -> float:
        return self.redis.cpu_seconds() if self.redis is not None else 0.0

    def cpu_seconds(self) -> float:
        """CPU time so far of every sidecar replica and of Redis (not the workers')."""
        return self.sidecar_cpu_seconds() + self.redis_cpu_seconds()


@contextlib.contextmanager
def deploy(
    backend: Backend,
    workers: int,
    *,
    max_in_flight: int,
    heartbeat_ms: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Deployment]:
    """`backend`'s sidecar(s) and `workers` worker processes, all stopped on
    exit; `env`: the sidecars' extra environment (CARSVC_* settings).
    `heartbeat_ms` (default: the sidecar's, 5 s) is also how often replicas
    read the cluster's directory: the first run on replica B waits up to that
    long for B to learn of A's workers."""
    children: list[Child] = []
    try:
        redis = None
        sidecar_args: tuple[str, ...] = ()
        if heartbeat_ms is not None:
            sidecar_args += ("--heartbeat-interval-ms", str(heartbeat_ms))
        if backend.replicas:
            redis = RedisServer()
            children.append(redis)
            sidecar_args += ("--backend", redis.url)
        sidecars = []
        for _ in range(max(backend.replicas, 1)):
            sidecars.append(Sidecar(*sidecar_args, env=env))
            children.append(sidecars[-1])
        procs = []
        for i in range(workers):
            proc = WorkerProcess(sidecars[0].address, worker_id=f"bench-{i}", max_in_flight=max_in_flight)
            children.append(proc)
            procs.append(proc)
        yield Deployment(sidecars, procs, redis)
    finally:
        for child in reversed(children):
            child.stop()
