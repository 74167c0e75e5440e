"""`carsvc workers`: the connected worker sessions (RegistryService.ListWorkers)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from carsvc.commands.base import ago, columns, emit, shorten


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    workers = commands.add_parser("workers", parents=[common], help="the connected workers")
    workers.set_defaults(operator=list_workers)


async def list_workers(client: Any, args: argparse.Namespace) -> int:
    workers = sorted(await client.list_workers(), key=lambda w: (w.worker_id, w.session_id))
    if args.json:
        for worker in workers:
            emit(worker)
        return 0
    columns(
        ("WORKER", "SESSION", "AGENTS", "IN FLIGHT", "DONE", "SDK", "CONNECTED", "LAST SEEN"),
        (
            (
                w.worker_id + (" (draining)" if w.draining else ""),
                w.session_id,
                shorten(",".join(w.agents), 40),
                f"{w.in_flight}/{w.max_in_flight}",
                f"{w.completed:,}",
                w.sdk or "-",
                ago(w.connected_unix_ms),
                ago(w.last_seen_unix_ms),
            )
            for w in workers
        ),
    )
    if not workers:
        print("(no workers connected)", file=sys.stderr)
    return 0
