"""A Python worker for tests/crosslang/test_large_results.py: agent "bigmapper" answers
BIG_ANSWER_BYTES (300 KiB) per item, so a map-reduce over 8 items has a result (2.4 MiB)
over the sidecar's max_inline_result_bytes (1 MiB).

    .venv/bin/python tests/crosslang/big_answer_worker.py --target 127.0.0.1:50051 --worker-id big
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from carsvc.worker import AgentContext, Worker

ITEM_MARKER = "Process this item: "
BIG_ANSWER_BYTES = 300 * 1024


def big_answer(item: str) -> str:
    """`item` repeated (space-separated) and cut to exactly BIG_ANSWER_BYTES bytes."""
    unit = f"{item} "
    return (unit * (BIG_ANSWER_BYTES // len(unit) + 1))[:BIG_ANSWER_BYTES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--worker-id", required=True)
    args = parser.parse_args()
    worker = Worker(args.target, worker_id=args.worker_id, max_in_flight=8, labels={"lang": "python"})

    async def bigmapper(ctx: AgentContext) -> str:
        print(f"started {ctx.assignment_id} {ctx.agent} {ctx.attempt}", flush=True)
        return big_answer(ctx.task.rsplit(ITEM_MARKER, 1)[-1])

    worker.add_agent("bigmapper", bigmapper)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
        serving = asyncio.create_task(worker.run())
        connected = asyncio.ensure_future(worker.connected.wait())
        await asyncio.wait({serving, connected}, return_when=asyncio.FIRST_COMPLETED)
        if worker.connected.is_set():
            print(f"ready {worker.worker_id} {worker.session_id}", flush=True)
        await serving

    asyncio.run(run())


if __name__ == "__main__":
    main()
