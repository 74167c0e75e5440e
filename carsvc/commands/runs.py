"""`carsvc runs list|get|watch|cancel`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from carsvc.commands.base import (
    EXIT_RUN_UNSUCCESSFUL,
    UsageError,
    ago,
    budget_text,
    columns,
    emit,
    parse_status,
    shorten,
    status_name,
    to_dict,
    when,
)

SUCCEEDED = 4  # RUN_STATUS_SUCCEEDED


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    runs = commands.add_parser("runs", help="list, inspect, watch and cancel runs")
    verbs = runs.add_subparsers(dest="verb", required=True, metavar="{list,get,watch,cancel}")

    listing = verbs.add_parser("list", parents=[common], help="retained runs, newest first")
    listing.add_argument("--thread", default="", help="only runs of this thread")
    listing.add_argument("--status", type=parse_status, default=0, help="only runs with this status (e.g. running)")
    listing.add_argument("--owner", default="", help="only runs of this owner (StartRun's agent_id)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0: all retained)")
    listing.set_defaults(operator=list_runs)

    get = verbs.add_parser("get", parents=[common], help="one run, with its result")
    _target(get)
    get.set_defaults(operator=get_run)

    watch = verbs.add_parser(
        "watch",
        parents=[common],
        help="follow a run's events to its end",
        description="Follow a run to its end: a live view on a terminal, one line per event otherwise, "
        "one JSON object per event with --json. Exits 0 when the run succeeded, 3 when it failed or "
        "was cancelled.",
    )
    watch.add_argument("run_id", metavar="RUN_ID")
    watch.add_argument("--after-seq", type=int, default=0, help="start after this event (default: from the first)")
    watch.add_argument("--plain", action="store_true", help="one line per event even on a terminal")
    watch.set_defaults(operator=watch_run)

    cancel = verbs.add_parser("cancel", parents=[common], help="cancel a run")
    _target(cancel)
    cancel.add_argument("--reason", default="", help="told to the run's workers (default: cancelled by request)")
    _owner(cancel)
    cancel.add_argument("--wait", action="store_true", help="return once the run has ended")
    cancel.set_defaults(operator=cancel_run)


def _target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID", nargs="?", default="")
    parser.add_argument("--thread", default="", help="the thread's active run (else its latest) instead of RUN_ID")


def _owner(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agent-id",
        default=os.environ.get("CARSVC_AGENT_ID", ""),
        help="the run's owner, as StartRun gave it (default: env CARSVC_AGENT_ID, else empty)",
    )


def _one_of(args: argparse.Namespace) -> None:
    if bool(args.run_id) == bool(args.thread):
        raise UsageError("give a RUN_ID or --thread (one of them)")


async def list_runs(client: Any, args: argparse.Namespace) -> int:
    from carsvc._proto.car.v1 import runs_pb2

    if args.limit < 0:
        raise UsageError("--limit must be 0 or more")
    runs: list[Any] = []
    token = ""
    while True:
        page = await client.runs.ListRuns(
            runs_pb2.ListRunsRequest(
                thread_id=args.thread, status=args.status, agent_id=args.owner, page_token=token,
                page_size=min(args.limit - len(runs), 1000) if args.limit else 1000,
            )
        )
        runs.extend(page.runs)
        token = page.next_page_token
        if not token or (args.limit and len(runs) >= args.limit):
            break
    if args.json:
        for run in runs:
            emit(run)
        return 0
    columns(
        ("RUN", "STATUS", "PATTERN", "THREAD", "OWNER", "CREATED", "REASON"),
        (
            (
                r.run_id, status_name(r.status), r.pattern, r.thread_id, r.agent_id or "-",
                ago(r.created_unix_ms), shorten(r.termination_reason, 40) or "-",
            )
            for r in runs
        ),
    )
    if not runs:
        print("(no runs)", file=sys.stderr)
    return 0


async def get_run(client: Any, args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    _one_of(args)
    run = await client.get_run(args.run_id, thread_id=args.thread)
    if args.json:
        emit(run)
        return 0
    fields = [
        ("run", run.run_id),
        ("status", status_name(run.status)),
        ("pattern", run.pattern),
        ("thread", run.thread_id),
        ("owner", run.agent_id or "-"),
        ("state scope", run.state_scope),
        ("created", when(run.created_unix_ms)),
        ("started", when(run.started_unix_ms)),
        ("finished", when(run.finished_unix_ms)),
        ("reason", run.termination_reason or "-"),
        ("detail", run.termination_detail or "-"),
        ("events", f"{run.last_seq:,}"),
        ("budget", budget_text(run.budget)),
    ]
    if run.labels:
        fields.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(run.labels.items()))))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}} {value}")
    if run.HasField("result"):
        print("result:")
        text = json_format.MessageToJson(run.result, preserving_proto_field_name=True, indent=2)
        print("\n".join("  " + line for line in text.splitlines()))
    return 0


async def cancel_run(client: Any, args: argparse.Namespace) -> int:
    _one_of(args)
    response = await client.cancel(
        args.run_id, thread_id=args.thread, agent_id=args.agent_id, reason=args.reason, wait=args.wait
    )
    if args.json:
        emit(response)
    elif response.already_finished:
        print(f"run {response.run.run_id} had already ended ({status_name(response.run.status)})")
    else:
        print(f"run {response.run.run_id}: {status_name(response.run.status)}")
    return 0


async def watch_run(client: Any, args: argparse.Namespace) -> int:
    from carsvc._proto.car.v1 import runs_pb2
    from carsvc.commands.runview import RunView

    # The run itself, not its result (which client.get_run would read in full).
    run = (await client.runs.GetRun(runs_pb2.GetRunRequest(run_id=args.run_id))).run
    view = RunView.of(run)
    live = not args.json and not args.plain and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    if live:
        await _watch_live(client, args, view)
    else:
        async for event in client.watch(run.run_id, args.after_seq):
            view.apply(event)
            if args.json:
                emit(to_dict(event))
            else:
                print(view.line(event), flush=True)
    return 0 if view.status == SUCCEEDED else EXIT_RUN_UNSUCCESSFUL


async def _watch_live(client: Any, args: argparse.Namespace, view: Any) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with Live(
        get_renderable=lambda: view.render(console.height), console=console, refresh_per_second=8,
        redirect_stdout=False, redirect_stderr=False,
    ) as live:
        async for event in client.watch(view.run_id, args.after_seq):
            view.apply(event)
        live.refresh()
