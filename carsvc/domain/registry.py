"""Agent specs registered by name, so patterns can refer to them.

The registry is bounded in count and in bytes, so ListAgents always answers in
one message that any client's default 4 MiB receive limit takes."""

from __future__ import annotations

from collections.abc import Callable

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.errors import AlreadyExists, NotFound, ResourceExhausted

AgentSpec = types_pb2.AgentSpec

MAX_AGENTS = 1_000
MAX_TOTAL_BYTES = 3 * 1024 * 1024


class AgentRegistry:
    __slots__ = ("_bytes", "_specs", "on_change")

    def __init__(self) -> None:
        self._specs: dict[str, AgentSpec] = {}
        self._bytes = 0
        # Told about every change made here (a shared backend keeps and spreads it).
        self.on_change: Callable[[str, AgentSpec | None], None] = lambda name, spec: None

    def register(self, spec: AgentSpec, *, replace: bool = False) -> AgentSpec:
        old = self._specs.get(spec.name)
        if old is not None and not replace:
            raise AlreadyExists(
                f"agent '{spec.name}' is already registered (set replace to overwrite it)",
                field="agent.name",
            )
        if old is None and len(self._specs) >= MAX_AGENTS:
            raise ResourceExhausted(
                f"{MAX_AGENTS} agents are registered already (the limit); unregister some first", field="agent"
            )
        size = spec.ByteSize()
        total = self._bytes - (old.ByteSize() if old is not None else 0) + size
        if total > MAX_TOTAL_BYTES:
            raise ResourceExhausted(
                f"registering this {size}-byte spec would make the registry {total} bytes; "
                f"the limit is {MAX_TOTAL_BYTES} (ListAgents answers in one message)",
                field="agent",
            )
        stored = AgentSpec()
        stored.CopyFrom(spec)
        self._specs[spec.name] = stored
        self._bytes = total
        self.on_change(spec.name, stored)
        return stored

    def apply(self, name: str, spec: AgentSpec | None) -> None:
        """Another replica's change (not reported to on_change; its limits were
        checked where it was made)."""
        old = self._specs.pop(name, None)
        if old is not None:
            self._bytes -= old.ByteSize()
        if spec is not None:
            self._specs[name] = spec
            self._bytes += spec.ByteSize()

    def get(self, name: str, *, field: str = "name") -> AgentSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise NotFound(f"no registered agent named '{name}'", field=field)
        return spec

    def unregister(self, name: str) -> bool:
        old = self._specs.pop(name, None)
        if old is None:
            return False
        self._bytes -= old.ByteSize()
        self.on_change(name, None)
        return True

    def list(self) -> list[AgentSpec]:
        return [self._specs[name] for name in sorted(self._specs)]
