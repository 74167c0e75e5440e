"""The benchmark's worker process: scripted agents, no model.

    python -m bench.worker ADDRESS [--worker-id ID] [--max-in-flight N] [--connections N]

Agents:
  noop      answers "ok" at once (dispatch cost only)
  echo      answers its task
  hold      sleeps N seconds, then answers (keeps assignments in flight)
  state     does N state get/set pairs through the runtime, answers the count

N is the task's last word, so a map-reduce item ("...: 2.5") works as well.

It prints "ready" once every connection has its welcome, and exits when stdin
closes (the benchmark's parent died or is done) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import uvloop

from carsvc.worker import AgentContext, Worker


async def noop(ctx: AgentContext) -> str:
    return "ok"


async def echo(ctx: AgentContext) -> str:
    return ctx.task


def _last_word(task: str) -> str:
    words = task.split()
    return words[-1] if words else "1"


async def hold(ctx: AgentContext) -> str:
    await asyncio.sleep(float(_last_word(ctx.task)))
    return "held"


async def state(ctx: AgentContext) -> str:
    pairs = int(_last_word(ctx.task))
    for i in range(pairs):
        await ctx.state.set("counter", i)
        await ctx.state.get("counter")
    return str(pairs)


AGENTS = {"noop": noop, "echo": echo, "hold": hold, "state": state}


async def serve(args: argparse.Namespace) -> None:
    workers = []
    for n in range(args.connections):
        suffix = f"-{n}" if args.connections > 1 else ""
        worker = Worker(args.address, worker_id=f"{args.worker_id}{suffix}", max_in_flight=args.max_in_flight)
        for name, handler in AGENTS.items():
            worker.add_agent(name, handler)
        workers.append(worker)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    await asyncio.wait_for(asyncio.gather(*(w.connected.wait() for w in workers)), 120)
    print("ready", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: None if os.read(stdin, 65536) else stop.set())
    await stop.wait()
    for w in workers:
        await w.stop()
    await asyncio.wait(tasks, timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("address")
    parser.add_argument("--worker-id", default="bench")
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--connections", type=int, default=1, help="worker sessions in this process")
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
