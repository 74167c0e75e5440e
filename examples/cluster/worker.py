"""The cluster example's worker (examples/cluster/README.md): serves "summarizer",
a map-reduce mapper that takes a moment per item, and "combiner", its reducer.

    python examples/cluster/worker.py 127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053

The argument names every replica: the worker connects to the first that answers
and, when that one goes away, to the next. Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import sys

from carsvc.worker import AgentContext, Worker

ITEM = "Process this item: "
SECONDS_PER_ITEM = 0.05

worker: Worker = Worker(
    sys.argv[1],
    worker_id="example-worker",
    max_in_flight=8,
    # One line per session, so that run.sh (and you) can see where it is connected.
    on_connect=lambda session: print(f"worker: connected to {worker.target}", flush=True),
)


@worker.agent("summarizer")
async def summarize(ctx: AgentContext) -> str:
    item = ctx.task.rsplit(ITEM, 1)[-1]
    await asyncio.sleep(SECONDS_PER_ITEM)  # your model call goes here
    return f"summary of {item}"


@worker.agent("combiner")
async def combine(ctx: AgentContext) -> str:
    summaries = [line for line in ctx.task.splitlines() if line.startswith("- [")]
    return f"{len(summaries)} summaries combined"


if __name__ == "__main__":
    worker.serve()
