"""Agent specs registered by name, so patterns can refer to them."""

from __future__ import annotations

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.errors import AlreadyExists, NotFound

AgentSpec = types_pb2.AgentSpec


class AgentRegistry:
    __slots__ = ("_specs",)

    def __init__(self) -> None:
        self._specs: dict[str, AgentSpec] = {}

    def register(self, spec: AgentSpec, *, replace: bool = False) -> AgentSpec:
        if spec.name in self._specs and not replace:
            raise AlreadyExists(
                f"agent '{spec.name}' is already registered (set replace to overwrite it)",
                field="agent.name",
            )
        stored = AgentSpec()
        stored.CopyFrom(spec)
        self._specs[spec.name] = stored
        return stored

    def get(self, name: str, *, field: str = "name") -> AgentSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise NotFound(f"no registered agent named '{name}'", field=field)
        return spec

    def unregister(self, name: str) -> bool:
        return self._specs.pop(name, None) is not None

    def list(self) -> list[AgentSpec]:
        return [self._specs[name] for name in sorted(self._specs)]
