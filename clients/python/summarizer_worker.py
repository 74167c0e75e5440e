"""Serves the example agents of clients/README.md with the Python SDK (carsvc.worker):
"summarizer" (a map-reduce mapper), "combiner" (its reducer) and "deployer" (asks a
human first).

    .venv/bin/python clients/python/summarizer_worker.py --target 127.0.0.1:50051

--target (or CARSVC_TARGET) may name several sidecar replicas, separated by commas.
CARSVC_WORKER_TOKEN, when set, is the worker token (never a flag: a command line is
visible to every local user). Ctrl-C or SIGTERM stops the worker (exit status 0); a
refused token ends it at once with one line on stderr (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable

import grpc

from carsvc.values import from_value
from carsvc.worker import AgentContext, RuntimeCallError, Worker

ITEM_MARKER = "Process this item: "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default=os.environ.get("CARSVC_TARGET", "127.0.0.1:50051"),
        help="the sidecar's host:port, or several replicas' separated by commas",
    )
    parser.add_argument("--worker-id")
    parser.add_argument("--agents", default="summarizer,combiner,deployer,pinger,ponger")
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--sleep-ms", type=int, default=0)
    args = parser.parse_args()

    worker = Worker(
        args.target,
        worker_id=args.worker_id,
        max_in_flight=args.max_in_flight,
        labels={"lang": "python"},
        token=os.environ.get("CARSVC_WORKER_TOKEN") or None,
        # A line on stdout per session, for scripts that wait for the worker.
        on_connect=lambda session: print(f"ready {worker.worker_id} {session}", flush=True),
    )

    async def summarize(ctx: AgentContext) -> str:
        item = ctx.task.rsplit(ITEM_MARKER, 1)[-1]
        ctx.progress(f"summarizing {item}")
        key = f"summaries/{item}"
        await ctx.state.set(key, {"worker": worker.worker_id, "sdk": "python"})
        if await ctx.state.get(key) is None:
            raise RuntimeError(f"state read back failed for {key}")
        ctx.emit("summarized", {"item": item, "worker": worker.worker_id})
        await asyncio.sleep(args.sleep_ms / 1000)
        return f"summary({item})"

    async def combine(ctx: AgentContext) -> str:
        answers = [line.split("] ", 1)[1] for line in ctx.task.splitlines() if line.startswith("- [") and "] " in line]
        return f"combined {len(answers)}: {'; '.join(answers)}"

    async def deploy(ctx: AgentContext) -> str:
        decision = await ctx.suspend_tool_call(
            "deploy-1", "deploy", {"target": ctx.task}, reason=f"deploys to {ctx.task}", timeout=300
        )
        if not decision.approved:
            return f"denied: {decision.reason}"
        result = decision.result
        return f"approved: {result if isinstance(result, str) else json.dumps(result)}"

    async def ping(ctx: AgentContext) -> str:
        """Sends "ping from <worker>" to the run's "ponger" (retrying while it has not started)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                await ctx.send("ponger", f"ping from {worker.worker_id}")
                break
            except RuntimeCallError as err:
                if err.code != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        reply = await ctx.recv(timeout=10)
        return f"pinger got {from_value(reply.payload)}"

    async def pong(ctx: AgentContext) -> str:
        """Waits for a message and answers its sender with "pong from <worker>"."""
        message = await ctx.recv(timeout=10)
        await ctx.send(message.from_agent, f"pong from {worker.worker_id}")
        return f"ponger got {from_value(message.payload)} from {message.from_agent}"

    handlers: dict[str, Callable[[AgentContext], Awaitable[str]]] = {
        "summarizer": summarize, "combiner": combine, "deployer": deploy, "pinger": ping, "ponger": pong,
    }

    def logged(handler: Callable[[AgentContext], Awaitable[str]]) -> Callable[[AgentContext], Awaitable[str]]:
        async def run(ctx: AgentContext) -> str:
            print(f"started {ctx.assignment_id} {ctx.agent} {ctx.attempt}", flush=True)
            return await handler(ctx)

        return run

    for name in args.agents.split(","):
        if name not in handlers:
            parser.error(f"unknown agent {name!r} (known: {', '.join(handlers)})")
        worker.add_agent(name, logged(handlers[name]))

    worker.serve()  # until Ctrl-C or SIGTERM; a refused token exits 1


if __name__ == "__main__":
    main()
