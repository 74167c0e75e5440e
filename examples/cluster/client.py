"""The cluster example's client (examples/cluster/README.md): runs a map-reduce
through the replicas it is given and prints how it ended.

    python examples/cluster/client.py 127.0.0.1:50052,127.0.0.1:50053 --items 12
    python examples/cluster/client.py ... --items 60 --kill PID --after 20

With --kill, the client SIGKILLs process PID (the replica it started the run
on) once --after mappers have finished, and keeps watching: its watch moves to
the next address and resumes after the last event it saw, while another
replica takes the run over and finishes it. Exit status 0 when the run
succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from carsvc import types
from carsvc.client import Client, agent, map_reduce


async def main(args: argparse.Namespace) -> int:
    async with Client(args.targets) as client:
        items = [f"file-{i:02}.txt" for i in range(args.items)]
        handle = await client.start_run(
            map_reduce(agent("summarizer"), agent("combiner"), "Summarize", items, max_concurrent=8)
        )
        print(f"client: run {handle.run_id[:8]} started on {client.target} ({len(items)} items)", flush=True)
        finished = 0
        async for event in client.watch(handle.run_id):  # resumes at the next address by itself
            kind = event.WhichOneof("kind")
            if kind == "agent_finished":
                finished += 1
                if args.kill and finished == args.after:
                    os.kill(args.kill, signal.SIGKILL)
                    print(f"client: {finished} agents done; SIGKILLed the run's replica (pid {args.kill})",
                          flush=True)
            elif kind == "status_changed" and "resumed" in event.status_changed.reason:
                print(f"client: watching on {client.target}: {event.status_changed.reason}", flush=True)
        run = await client.get_run(handle.run_id)
        result = run.result.map_reduce
        print(f"client: run {run.run_id[:8]} {types.RunStatus.Name(run.status)}: "
              f"{len(result.map_outputs)} map outputs, reduced: {result.reduced_answer!r}", flush=True)
        if run.status != types.RUN_STATUS_SUCCEEDED:
            print(f"client: why: {run.termination_reason}: {run.termination_detail}", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="runs a map-reduce through carsvc replicas")
    parser.add_argument("targets", help="replica addresses, separated by commas")
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--kill", type=int, default=0, help="the pid of a replica to SIGKILL mid-run")
    parser.add_argument("--after", type=int, default=20, help="... once this many agents have finished")
    sys.exit(asyncio.run(main(parser.parse_args())))
