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
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
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

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
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
                    raise RuntimeError(
                        f"{self.args[2:4]} exited ({self.proc.returncode}) before {regex.pattern!r}:\n{tail}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {regex.pattern!r} from {self.args[2:4]} within {timeout}s")
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
    workers: int, *, max_in_flight: int, sidecar_args: Sequence[str] = ()
) -> Iterator[tuple[Sidecar, list[WorkerProcess]]]:
    """A sidecar and `workers` worker processes, all stopped on exit."""
    children: list[Child] = []
    try:
        sidecar = Sidecar(*sidecar_args)
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
