"""A scripted worker process for tests that need a real process boundary.

    python -m tests.programs.scripted_worker ADDRESS --agent NAME [--sleep S]
        [--worker-id ID] [--max-in-flight N] [--answer TEXT] [--suspend TOOL]
        [--reply-when SUBSTRING REPLY]...

Each assignment sleeps S seconds (the stand-in for a model call), then answers
"<answer> from <worker-id>: <task>", or REPLY verbatim when its task contains the
SUBSTRING of a --reply-when (the first that matches; e.g. a supervisor's review
that depends on the round named in its task). It prints "started <assignment_id>
<name>" for every assignment it receives, so a test can kill it mid-assignment
and see what was dispatched, and "cancelled <assignment_id> <reason>" for every
assignment the sidecar cancels (the reason of its AssignmentCancel). With
--suspend, an agent first suspends a call of TOOL (tool call id "<name>-call")
and answers "approved: <result>" or "denied".
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from carsvc.worker import AgentContext, Worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--agent", action="append", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--worker-id", default="scripted")
    parser.add_argument("--max-in-flight", type=int, default=1)
    parser.add_argument("--answer", default="answer")
    parser.add_argument("--suspend", default="")
    parser.add_argument("--reply-when", nargs=2, action="append", default=[], metavar=("SUBSTRING", "REPLY"))
    args = parser.parse_args()

    worker = Worker(args.address, worker_id=args.worker_id, max_in_flight=args.max_in_flight)

    async def handle(ctx: AgentContext) -> str:
        print(f"started {ctx.assignment_id} {ctx.name} {worker.session_id}", flush=True)
        try:
            await asyncio.sleep(args.sleep)
            if args.suspend:
                decision = await ctx.suspend_tool_call(f"{ctx.name}-call", args.suspend, {"task": ctx.task})
                return f"approved: {decision.result}" if decision.approved else "denied"
        except asyncio.CancelledError:
            print(f"cancelled {ctx.assignment_id} {ctx.cancel_reason}", flush=True)
            raise
        for substring, reply in args.reply_when:
            if substring in ctx.task:
                return str(reply)
        return f"{args.answer} from {args.worker_id}: {ctx.task}"

    for agent in args.agent:
        worker.add_agent(agent, handle)

    async def run() -> None:
        serving = asyncio.create_task(worker.run())
        await worker.connected.wait()
        print("ready", flush=True)
        await serving

    uvloop.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
