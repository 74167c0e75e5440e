"""`carsvc budget get`: a shared budget (BudgetService), or a run's own."""

from __future__ import annotations

import argparse
from typing import Any

from carsvc.commands.base import UsageError, budget_text, emit


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    budget = commands.add_parser("budget", help="read budgets")
    verbs = budget.add_subparsers(dest="verb", required=True, metavar="{get}")
    get = verbs.add_parser(
        "get",
        parents=[common],
        help="a budget's spend and limits",
        description="A shared budget's snapshot (BudgetService.GetBudget), or with --run a run's.",
    )
    get.add_argument("budget_id", metavar="BUDGET_ID", nargs="?", default="")
    get.add_argument("--run", metavar="RUN_ID", default="", help="the budget of this run instead")
    get.set_defaults(operator=get_budget)


async def get_budget(client: Any, args: argparse.Namespace) -> int:
    from carsvc._proto.car.v1 import budget_pb2, budget_pb2_grpc, runs_pb2

    if bool(args.budget_id) == bool(args.run):
        raise UsageError("give a BUDGET_ID or --run RUN_ID (one of them)")
    if args.run:
        snapshot = (await client.runs.GetRun(runs_pb2.GetRunRequest(run_id=args.run))).run.budget
    else:
        stub = budget_pb2_grpc.BudgetServiceStub(client.channel)
        snapshot = (await stub.GetBudget(budget_pb2.GetBudgetRequest(budget_id=args.budget_id))).budget
    if args.json:
        emit(snapshot)
    else:
        print(budget_text(snapshot))
    return 0
