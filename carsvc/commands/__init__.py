"""The operator's commands, against a running sidecar (docs/cli.md):

    carsvc runs list|get|watch|cancel     carsvc approve|deny RUN_ID TOOL_CALL_ID
    carsvc workers                        carsvc state get|set|keys
    carsvc budget get

One module per noun; each registers its parsers with an `operator` coroutine
`(client, args) -> exit code`, which `run` executes (carsvc.commands.base.execute).
Only argparse is imported until a command runs, so `carsvc --help` stays fast."""

from __future__ import annotations

import argparse
from typing import Any

from carsvc.commands import budget, decisions, runs, state, workers
from carsvc.commands.base import connection_options, execute

__all__ = ["register", "run"]


def register(commands: Any) -> None:
    """Adds the operator commands to `carsvc`'s subparsers."""
    common = connection_options()
    for noun in (runs, decisions, workers, state, budget):
        noun.register(commands, common)


def run(args: argparse.Namespace) -> int | None:
    """Runs the operator command `args` selected; None when it selected none."""
    operator = getattr(args, "operator", None)
    return None if operator is None else execute(operator, args)
