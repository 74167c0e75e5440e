"""Runs a map-reduce of the example agents (clients/README.md) with the Python SDK
(carsvc.client) and prints the result; --json prints one JSON object.

    .venv/bin/python clients/python/mapreduce_client.py --target 127.0.0.1:50051 --items 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc

from carsvc import types
from carsvc.client import Client, agent, map_reduce


async def run(args: argparse.Namespace) -> int:
    async with Client(args.target) as client:
        items = [f"item-{i}" for i in range(1, args.items + 1)]
        handle = await client.start_run(
            map_reduce(agent(args.mapper), agent(args.reducer), "Summarize each item", items,
                       max_concurrent=args.max_concurrent),
            agent_id="mapreduce-client-python",
        )
        # Watch the events; a broken watch resumes after the last seq it saw.
        finished_by: dict[str, str] = {}
        last_seq, events, done = 0, 0, False
        while not done:
            try:
                async for event in client.watch(handle.run_id, after_seq=last_seq):
                    last_seq, events = event.seq, events + 1
                    kind = event.WhichOneof("kind")
                    if kind == "agent_finished":
                        finished_by[event.agent_finished.output.name] = event.agent_finished.worker_id
                    done = done or kind == "run_finished"
            except grpc.aio.AioRpcError as err:
                print(f"watch broke, resuming after seq {last_seq}: {err.details()}", file=sys.stderr)
                await asyncio.sleep(0.2)
        run = await client.get_run(handle.run_id)
        result = run.result.map_reduce
        status = types.RunStatus.Name(run.status)
        if args.json:
            print(json.dumps({
                "run_id": run.run_id, "status": status, "reduced_answer": result.reduced_answer,
                # Why it ended: "completed", "agent_failed", ... and a sentence.
                "termination_reason": run.termination_reason, "termination_detail": run.termination_detail,
                "answers": [o.answer for o in result.map_outputs],
                "errors": [o.error if o.HasField("error") else "" for o in result.map_outputs],
                "finished_by": finished_by, "events": events,
            }))
        else:
            print(f"run {run.run_id}: {status}")
            if run.status != types.RUN_STATUS_SUCCEEDED:
                print(f"  why: {run.termination_detail} ({run.termination_reason})")
            for o in result.map_outputs:
                print(f"  {o.name:<14} {o.answer or o.error:<20} by {finished_by.get(o.name, '')}")
            print(f"reduced: {result.reduced_answer}")
        if run.status != types.RUN_STATUS_SUCCEEDED:
            print(f"mapreduce-client: run {run.run_id} {status}: {run.termination_reason}: {run.termination_detail}",
                  file=sys.stderr)
            return 1
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("CARSVC_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--items", type=int, default=5)
    parser.add_argument("--mapper", default="summarizer")
    parser.add_argument("--reducer", default="combiner")
    parser.add_argument("--max-concurrent", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
