"""`carsvc approve` and `carsvc deny`: answer a tool call a run's agent suspended."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from carsvc.commands.base import UsageError, emit


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    approve = commands.add_parser(
        "approve",
        parents=[common],
        help="approve a waiting tool call",
        description="Approve a tool call an agent of the run suspended (the tool_call_id of its "
        "tool_call_suspended event, as `carsvc runs watch` shows it). A decision for a call that has "
        "not suspended yet is kept and delivered when it does.",
    )
    _common(approve)
    approve.add_argument("--result", metavar="JSON", help="the value handed to the waiting agent (JSON)")
    approve.set_defaults(operator=decide, action="approve")

    deny = commands.add_parser(
        "deny",
        parents=[common],
        help="refuse a waiting tool call",
        description="Refuse a tool call an agent of the run suspended; the agent is told `reason`.",
    )
    _common(deny)
    deny.add_argument("--reason", default="", help="why, told to the waiting agent")
    deny.set_defaults(operator=decide, action="deny")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID")
    parser.add_argument("tool_call_id", metavar="TOOL_CALL_ID")
    parser.add_argument(
        "--agent-id",
        default=os.environ.get("CARSVC_AGENT_ID", ""),
        help="the run's owner, as StartRun gave it (default: env CARSVC_AGENT_ID, else empty)",
    )
    parser.add_argument("--decision-id", default="", help="idempotency key (default: decision_<TOOL_CALL_ID>)")


async def decide(client: Any, args: argparse.Namespace) -> int:
    from carsvc.client import deny, resume

    if args.action == "approve":
        result = None
        if args.result is not None:
            try:
                result = json.loads(args.result)
            except json.JSONDecodeError as err:
                raise UsageError(f"--result is not JSON ({err.msg}); quote a string as '\"text\"'") from None
        decision = resume(args.tool_call_id, result, decision_id=args.decision_id)
    else:
        decision = deny(args.tool_call_id, args.reason, decision_id=args.decision_id)
    response = await client.submit_decisions(decision, run_id=args.run_id, agent_id=args.agent_id)
    if args.json:
        emit(response)
        return 0
    verb = "approved" if args.action == "approve" else "denied"
    if response.applied_decision_ids:
        print(f"{verb} {args.tool_call_id} on run {args.run_id}")
    elif response.queued_decision_ids:
        print(f"{verb} {args.tool_call_id} on run {args.run_id} (kept until the call suspends)")
    else:
        print(f"{args.tool_call_id} on run {args.run_id} was already decided (decision applied earlier)")
    return 0
