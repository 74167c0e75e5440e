"""`carsvc demo`: a sidecar and a scripted worker in one process, a map-reduce
over a dozen items with a live progress bar, and the result."""

from __future__ import annotations

import asyncio
import random
import sys
from typing import TextIO

from carsvc.client import Client, agent, map_reduce
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, Result, Worker

FILES = [
    "auth.py", "billing.py", "cache.py", "cli.py", "config.py", "db.py",
    "events.py", "http.py", "jobs.py", "mail.py", "search.py", "users.py",
]


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


async def demo(items: int = 12, out: TextIO = sys.stdout) -> int:
    sidecar = Sidecar(Settings(port=0, log_level="WARNING"))
    await sidecar.start()
    worker = Worker(sidecar.address, worker_id="demo-worker", max_in_flight=4)

    @worker.agent("summarizer")
    async def summarize(ctx: AgentContext) -> Result:
        item = ctx.task.rsplit("Process this item: ", 1)[-1]
        ctx.progress(f"reading {item}")
        await asyncio.sleep(random.uniform(0.05, 0.25))  # stands in for a model call
        await ctx.state.set(f"summary/{item}", {"lines": random.randint(50, 900)})
        return Result(answer=f"{item}: looks tidy", input_tokens=120, output_tokens=12, cost_usd=0.0004)

    @worker.agent("combiner")
    async def combine(ctx: AgentContext) -> Result:
        lines = [line for line in ctx.task.splitlines() if line.startswith("- [")]
        return Result(answer=f"{len(lines)} files reviewed; all look tidy.", input_tokens=400, output_tokens=20)

    serving = asyncio.create_task(worker.run())
    try:
        await worker.connected.wait()
        names = (FILES * (items // len(FILES) + 1))[:items]
        async with Client(sidecar.address) as client:
            handle = await client.start_run(
                map_reduce(agent("summarizer"), agent("combiner"), "Review this file", names, max_concurrent=4)
            )
            print(f"run {handle.run_id}: map-reduce over {items} items", file=out)
            done = 0
            async for event in client.watch(handle.run_id):
                kind = event.WhichOneof("kind")
                role = event.agent_finished.role if kind == "agent_finished" else event.agent_skipped.role
                if kind in ("agent_finished", "agent_skipped") and role == "mapper":
                    done += 1
                    print(f"\r{_bar(done, items)}", end="", file=out, flush=True)
            run = await client.get_run(handle.run_id)
        print(file=out)
        result = run.result.map_reduce
        for output in result.map_outputs:
            print(f"  {output.name:>14}  {output.answer or output.error}", file=out)
        print(f"reduced: {result.reduced_answer}", file=out)
        print(
            f"budget: {run.budget.agents_started} agents, {run.budget.total_tokens} tokens, "
            f"${run.budget.cost_usd:.4f}",
            file=out,
        )
        return 0 if run.status == 4 else 1  # RUN_STATUS_SUCCEEDED
    finally:
        await worker.stop()
        await serving
        await sidecar.stop(grace=1.0)
