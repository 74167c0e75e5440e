"""Real processes for tests that need a process boundary: a sidecar on a data
directory (to SIGKILL and restart on the same port), scripted workers, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def sidecar_process(
    port: int, store: Path | str, env: dict[str, str] | None = None, log: list[str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real sidecar process keeping its runs in `store`: a data directory, or
    a redis:// URL; its log lines go to `log`."""
    lines = [] if log is None else log
    where = ["--backend", store] if isinstance(store, str) else ["--data-dir", str(store)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", str(port), *where,
        "--heartbeat-interval-ms", "300", cwd=ROOT, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    stderr = proc.stderr
    assert stderr is not None

    async def read_log() -> None:
        while line := await stderr.readline():
            lines.append(line.decode(errors="replace"))

    # Keep reading: a full pipe would stall the sidecar's logging, and with it the sidecar.
    reader = asyncio.create_task(read_log())
    try:
        async with asyncio.timeout(30):
            while not any("listening on" in line for line in lines):
                assert not reader.done(), "the sidecar exited before listening:\n" + "".join(lines)
                await asyncio.sleep(0.02)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await asyncio.wait_for(reader, 10)


class ScriptedWorker:
    """tests/programs/scripted_worker.py as a process; `started` collects the
    agent names it was handed, in order, each with its generation: 0 for the
    worker's first session with a sidecar, 1 for the next (after a restart) …"""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.started: list[tuple[int, str]] = []
        self._sessions: dict[str, int] = {}
        self.ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, address: str, *args: str) -> ScriptedWorker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.programs.scripted_worker", address, *args,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(proc)
        await asyncio.wait_for(worker.ready.wait(), 30)
        return worker

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self._line(line.decode())

    def _line(self, text: str) -> None:
        words = text.split()
        if words[:1] == ["ready"]:
            self.ready.set()
        elif words[:1] == ["started"] and len(words) >= 4:
            generation = self._sessions.setdefault(words[3], len(self._sessions))
            self.started.append((generation, words[2]))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await asyncio.wait_for(self._reader, 10)
