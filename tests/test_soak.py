"""Memory that does not creep: 100,000 sequential single runs through a real
sidecar process (retention 10,000) leave its RSS flat between 50k and 100k.

Slow (about a minute); run with `python -m pytest -m slow tests/test_soak.py`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator

import pytest

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, single
from carsvc.worker import AgentContext, Worker
from tests.procs import ROOT, free_port

RUNS = 100_000
SAMPLE_EVERY = 10_000
IN_FLIGHT = 64
# Allocator noise on a ~200 MiB process: growth beyond this between the 50k and
# 100k samples is a leak (it was +50 MiB before scopes and assignment ids were bounded).
SLACK_MIB = 12


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextlib.asynccontextmanager
async def sidecar_process(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", str(port), "--log-level", "WARNING",
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CARSVC_FINISHED_RUN_RETENTION": "10000"},
    )
    try:
        assert proc.stderr is not None
        for _ in range(200):
            await asyncio.sleep(0.05)
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
        yield proc
    finally:
        proc.kill()
        await proc.wait()


async def echo(ctx: AgentContext) -> str:
    return ctx.task


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_rss_is_flat_between_50k_and_100k_sequential_runs() -> None:
    port = free_port()
    async with sidecar_process(port) as proc:
        address = f"127.0.0.1:{port}"
        worker = Worker(address, max_in_flight=IN_FLIGHT)
        worker.add_agent("echo", echo)
        serving = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 30)
        samples: dict[int, float] = {}
        async with Client(address) as client, client.run_stream() as stream:
            pending: set[asyncio.Task[object]] = set()
            for n in range(1, RUNS + 1):
                pending.add(asyncio.ensure_future(stream.run(single(agent("echo"), f"task {n}"))))
                if len(pending) >= IN_FLIGHT:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        assert task.result().status == types_pb2.RUN_STATUS_SUCCEEDED  # type: ignore[attr-defined]
                if n % SAMPLE_EVERY == 0:
                    samples[n] = rss_mib(proc.pid)
            await asyncio.gather(*pending)
        await worker.stop()
        await asyncio.wait_for(serving, 10)
    growth = samples[RUNS] - samples[RUNS // 2]
    report = ", ".join(f"{n // 1000}k: {mib:.0f}" for n, mib in sorted(samples.items()))
    print(f"sidecar RSS (MiB) after {report}")
    assert growth <= SLACK_MIB, f"RSS grew {growth:.1f} MiB between 50k and 100k runs ({report})"
