"""What durability costs: state writes/s and runs/s with no journal and with
`--data-dir` under each `journal_sync` mode, measured in one run.

    python -m bench.journal_ack                 # 3 rounds of 5 s per mode and load
    python -m bench.journal_ack --seconds 1 --rounds 1   # a quick look

Each mode gets its own sidecar process (`carsvc serve --data-dir <tmp>`) and one
worker process (`python -m bench.worker`, the `noop` agent answering at once).
The client (this process) drives two loads, one after the other:

* state: 64 concurrent writers, each `StateService.Set` of its own key, awaited;
* runs: 256 single-agent runs in flight on one Submit stream (client.run_stream).

It prints the median per mode and its ratio to `normal` (BENCHMARKS.md,
"Durability"). Strict mode's figures depend on the disk's fsync latency.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time

import uvloop

from bench.procs import Sidecar, WorkerProcess
from carsvc.client import Client, agent, single

MODES = ("memory", "normal", "full", "strict")
WRITERS = 64
RUNS_IN_FLIGHT = 256


async def _state_rate(client: Client, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def writer(n: int) -> None:
        nonlocal done
        for i in itertools.count():
            if time.monotonic() >= deadline:
                return
            await client.set_state("bench", f"k{n}", i)
            done += 1

    began = time.monotonic()
    await asyncio.gather(*(writer(n) for n in range(WRITERS)))
    return done / (time.monotonic() - began)


async def _run_rate(client: Client, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds
    async with client.run_stream() as stream:

        async def lane() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await stream.run(single(agent("noop"), "x"))
                done += 1

        began = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(RUNS_IN_FLIGHT)))
        return done / (time.monotonic() - began)


async def _measure(mode: str, seconds: float, rounds: int) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory(prefix="carsvc-bench-") as data_dir:
        args = [] if mode == "memory" else ["--data-dir", data_dir]
        env = {} if mode == "memory" else {"CARSVC_JOURNAL_SYNC": mode}
        sidecar = Sidecar(*args, env=env)
        worker = None
        try:
            worker = WorkerProcess(sidecar.address, worker_id="bench-journal", max_in_flight=RUNS_IN_FLIGHT)
            async with Client(sidecar.address) as client:
                await _state_rate(client, 0.5)  # warm-up
                await _run_rate(client, 0.5)
                states, runs = [], []
                for _ in range(rounds):
                    states.append(await _state_rate(client, seconds))
                    runs.append(await _run_rate(client, seconds))
                return states, runs
        finally:
            if worker is not None:
                worker.stop()
            sidecar.stop()


def _cell(values: list[float], base: float | None) -> str:
    median = statistics.median(values)
    text = f"{median:,.0f} [{min(values):,.0f}, {max(values):,.0f}]"
    return f"{text} ({median / base:.2f}x)" if base else text


async def main(seconds: float, rounds: int) -> None:
    results = {}
    for mode in MODES:
        print(f"measuring {mode} ...", flush=True)
        results[mode] = await _measure(mode, seconds, rounds)
    base_state = statistics.median(results["normal"][0])
    base_runs = statistics.median(results["normal"][1])
    print()
    print(f"| journal | state sets/s ({WRITERS} writers) | runs/s ({RUNS_IN_FLIGHT} in flight) |")
    print("|---|---|---|")
    for mode, (states, runs) in results.items():
        label = "none (in memory)" if mode == "memory" else f"`{mode}`"
        print(f"| {label} | {_cell(states, base_state)} | {_cell(runs, base_runs)} |")
    print()
    print(f"median [min, max] of {rounds} rounds of {seconds:g} s; (x) = ratio to `normal`")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per mode and load")
    options = parser.parse_args()
    uvloop.run(main(options.seconds, options.rounds))
