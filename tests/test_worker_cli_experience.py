"""What a person running a Python worker sees (issue 16, item 7), through real worker
processes: clients/python/summarizer_worker.py, and a bare script calling
Worker.serve(). A line when connected (worker id, agents, sidecar address); Ctrl-C
exits quietly with status 0; one line per reconnect attempt with its delay, never a
traceback; CARSVC_WORKER_TOKEN is read; a refused token is one line, status 1."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from carsvc.client import Client, agent, single
from carsvc.server import Sidecar
from carsvc.worker import Worker
from tests.conftest import TEST_SETTINGS
from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "clients/python/summarizer_worker.py")
AGENTS = "summarizer, combiner, deployer, pinger, ponger"
WORKER_TOKEN = "w-5b0c7e2d9a1f46b38c70"
CLIENT_TOKEN = "c-8e1d3a6f0b2c47d59a13"
# A script as the docs show it: handlers, then serve().
SERVE_SCRIPT = """
import sys
from carsvc.worker import Worker
worker = Worker(sys.argv[1], worker_id="bare")
worker.add_agent("a", lambda ctx: None)
worker.on_connect = lambda session: print("ready", flush=True)
worker.serve()
print("serve() returned", flush=True)
"""
RECONNECT_LINE = re.compile(
    r"^\S+ \S+ WARNING worker (\S+): session ended: UNAVAILABLE .*\(at (\S+)\); "
    r"reconnecting in ([\d.]+) s \(attempt (\d+)\)$"
)


class _Program:
    """A worker process; its stdout and stderr lines, as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.stdout)),
            asyncio.create_task(self._read(proc.stderr, self.stderr)),
        ]

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> _Program:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
        )
        return cls(proc)

    @staticmethod
    async def _read(stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode(errors="replace").rstrip("\n"))

    async def wait_for(self, lines: list[str], pattern: str, timeout: float = 30) -> re.Match[str]:
        async with asyncio.timeout(timeout):
            while True:
                for line in lines:
                    if found := re.search(pattern, line):
                        return found
                assert self.proc.returncode is None, f"exited {self.proc.returncode}: {self.stdout} {self.stderr}"
                await asyncio.sleep(0.02)

    async def exit_code(self, timeout: float = 15) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._readers), 10)
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def programs() -> AsyncIterator[list[_Program]]:
    started: list[_Program] = []
    try:
        yield started
    finally:
        for program in started:
            program.kill()
            await program.exit_code()


async def test_the_worker_logs_a_line_when_connected(sidecar: Sidecar, caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker(sidecar.address, worker_id="hello")
    worker.add_agent("writer", lambda ctx: asyncio.sleep(0, "w"))
    worker.add_agent("review*", lambda ctx: asyncio.sleep(0, "r"))
    with caplog.at_level(logging.INFO, logger="carsvc.worker"):
        serving = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 10)
        await worker.stop()
        await asyncio.wait_for(serving, 5)
    assert [r.getMessage() for r in caplog.records if r.name == "carsvc.worker"] == [
        f"worker hello: connected to {sidecar.address} (session {worker.session_id}), serving writer, review*"
    ]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_the_example_worker_says_where_it_connected_and_stops_quietly(
    sidecar: Sidecar, programs: list[_Program], sig: signal.Signals
) -> None:
    worker = await _Program.start(EXAMPLE, "--target", sidecar.address, "--worker-id", "example")
    programs.append(worker)
    await worker.wait_for(worker.stdout, r"^ready example s-")
    connected = await worker.wait_for(worker.stderr, r"INFO worker example: connected to (\S+) \(session (\S+)\), (.+)")
    assert connected.groups() == (sidecar.address, worker.stdout[0].split()[2], f"serving {AGENTS}")
    async with Client(sidecar.address) as client:  # it serves
        run = await client.run(single(agent("combiner"), "- [a] one\n- [b] two"))
    assert run.result.single.output.answer == "combined 2: one; two"
    worker.proc.send_signal(sig)
    assert await worker.exit_code() == 0
    assert not any("Traceback" in line for line in worker.stderr), worker.stderr
    assert len(worker.stderr) == 1, worker.stderr  # the connected line, and nothing else


async def test_reconnect_attempts_are_one_line_each_with_the_delay(programs: list[_Program]) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    worker = await _Program.start(EXAMPLE, "--target", ",".join(dead), "--worker-id", "lonely")
    programs.append(worker)
    await worker.wait_for(worker.stderr, r"\(attempt 5\)$")
    worker.proc.send_signal(signal.SIGINT)  # in the middle of a backoff wait
    assert await worker.exit_code() == 0
    attempts = [RECONNECT_LINE.match(line) for line in worker.stderr]
    assert all(attempts), worker.stderr  # nothing but the attempts: no traceback
    found = [(m[1], m[2], float(m[3]), int(m[4])) for m in attempts if m]
    assert [n for *_, n in found] == list(range(1, len(found) + 1))
    assert [delay for _, _, delay, _ in found[:5]] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert [at for _, at, _, _ in found] == [dead[i % 2] for i in range(len(found))]
    assert {who for who, *_ in found} == {"lonely"}


async def test_serve_returns_on_ctrl_c_with_status_0(sidecar: Sidecar, programs: list[_Program]) -> None:
    for before_connecting in (False, True):
        address = f"127.0.0.1:{free_port()}" if before_connecting else sidecar.address
        script = await _Program.start("-c", SERVE_SCRIPT, address)
        programs.append(script)
        if before_connecting:
            await script.wait_for(script.stderr, r"reconnecting in")
        else:
            await script.wait_for(script.stdout, r"^ready$")
        script.proc.send_signal(signal.SIGINT)
        assert await script.exit_code() == 0
        assert script.stdout[-1] == "serve() returned"
        assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in script.stderr), script.stderr


@pytest.fixture
async def guarded() -> AsyncIterator[Sidecar]:
    """A sidecar that wants tokens."""
    server = Sidecar(TEST_SETTINGS.replace(worker_tokens=WORKER_TOKEN, client_tokens=CLIENT_TOKEN))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


async def test_the_example_worker_reads_its_token_and_a_refused_one_is_one_line(
    guarded: Sidecar, programs: list[_Program]
) -> None:
    sidecar = guarded
    trusted = await _Program.start(
        EXAMPLE, "--target", sidecar.address, "--worker-id", "trusted", env={"CARSVC_WORKER_TOKEN": WORKER_TOKEN}
    )
    programs.append(trusted)
    await trusted.wait_for(trusted.stdout, r"^ready trusted ")

    refused = await _Program.start(
        EXAMPLE, "--target", sidecar.address, "--worker-id", "refused",
        env={"CARSVC_WORKER_TOKEN": "w-0000000000000000wrong"},
    )
    programs.append(refused)
    assert await refused.exit_code() == 1
    assert refused.stdout == []
    assert len(refused.stderr) == 1, refused.stderr
    assert refused.stderr[0].endswith(
        f"ERROR worker refused: the sidecar at {sidecar.address} refused the worker's credentials "
        "(UNAUTHENTICATED: the bearer token is not a worker token of this sidecar "
        "(/car.v1.WorkerService/Connect needs one)); check the worker token; not reconnecting"
    )
    assert WORKER_TOKEN not in refused.stderr[0]

    # The same from any program that calls serve(): no chained traceback.
    bare = await _Program.start("-c", SERVE_SCRIPT, sidecar.address)
    programs.append(bare)
    assert await bare.exit_code() == 1
    assert len(bare.stderr) == 1 and "ERROR worker bare: " in bare.stderr[0], bare.stderr
    assert "refused the worker's credentials (UNAUTHENTICATED: " in bare.stderr[0]

