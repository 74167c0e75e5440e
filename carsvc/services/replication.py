"""Every replica's copy of the state and the agent registry, kept current
from the others' changes (a shared backend's change feed).

Reads of state and of registered agents are answered from this replica's
copy; a write is made here, stored, and reaches the other replicas' copies
within a round trip (docs/operations.md, "What is kept where")."""

from __future__ import annotations

import asyncio
import logging

from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.backend import Change, ChangeFeed
from carsvc.domain.registry import AgentRegistry
from carsvc.domain.runs import RunManager
from carsvc.services.background import cancel_and_wait

log = logging.getLogger("carsvc.replication")


class Replication:
    def __init__(self, feed: ChangeFeed, runs: RunManager, registry: AgentRegistry) -> None:
        self.feed = feed
        self.runs = runs
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self.applied = 0
        self.resyncs = 0

    async def start(self) -> None:
        for spec in await self.feed.agents():
            self.registry.apply(spec.name, spec)
        self.registry.on_change = self.feed.agent_changed
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="carsvc-replication")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def _follow(self) -> None:
        async for change in self.feed.changes():
            try:
                await self._apply(change)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("a change from another replica could not be applied (%s %r)", change.kind, change.name)

    async def _apply(self, change: Change) -> None:
        if change.kind == "state":
            value = struct_pb2.Value.FromString(change.data) if change.data is not None else None
            self.runs.copy_state(change.name, change.key, value, change.writer)
        elif change.kind == "agent":
            spec = types_pb2.AgentSpec.FromString(change.data) if change.data is not None else None
            self.registry.apply(change.name, spec)
        elif change.kind == "resync":
            self.resyncs += 1
            if self.resyncs > 1:  # the first is the subscription starting: start() read everything
                self.runs.copy_all_state(await self.feed.state())
                names = {s.name for s in self.registry.list()}
                agents = await self.feed.agents()
                for spec in agents:
                    self.registry.apply(spec.name, spec)
                for gone in names - {s.name for s in agents}:
                    self.registry.apply(gone, None)
            return
        self.applied += 1



