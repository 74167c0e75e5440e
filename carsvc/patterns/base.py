"""What every pattern shares: the request checks, the agent resolver and the
outcome a pattern hands back to the run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import RunInfra

AgentRef = patterns_pb2.AgentRef
AgentSpec = types_pb2.AgentSpec
RunResult = patterns_pb2.RunResult

MAX_NAME_CHARS = 256


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits every pattern enforces (configurable on the server)."""

    max_field_bytes: int = 1 << 20
    max_items: int = 100_000
    max_agents: int = 1_000


@dataclass(slots=True)
class PatternOutcome:
    """A finished pattern: its result, and whether the run counts as failed."""

    result: RunResult
    failed: bool = False
    reason: str = "completed"
    detail: str = ""


class Pattern(Protocol):
    name: ClassVar[str]

    async def run(self, infra: RunInfra) -> PatternOutcome: ...


# Resolves an AgentRef (inline spec or registered name) to a spec; `field` names
# the ref in error messages.
Resolver = Callable[[AgentRef, str], AgentSpec]


def check_spec(spec: AgentSpec, field: str) -> None:
    if not spec.name:
        raise InvalidArgument("must not be empty", field=f"{field}.name")
    if len(spec.name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"is {len(spec.name)} characters; the limit is {MAX_NAME_CHARS}", field=f"{field}.name"
        )
    if any(c.isspace() for c in spec.name):
        raise InvalidArgument(f"'{spec.name}' must not contain whitespace", field=f"{field}.name")


def check_text(value: str, field: str, limits: Limits) -> None:
    size = len(value.encode())
    if size > limits.max_field_bytes:
        raise InvalidArgument(
            f"is {size} bytes; the limit is {limits.max_field_bytes} (max_field_bytes)", field=field
        )


def require_ref(container: object, name: str, field: str) -> AgentRef:
    """The AgentRef field `name` of `container`, which must be set."""
    if not container.HasField(name):  # type: ignore[attr-defined]
        raise InvalidArgument("is required", field=f"{field}.{name}" if field else name)
    ref: AgentRef = getattr(container, name)
    return ref


def check_count(count: int, field: str, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidArgument(f"has {count} {what}; the limit is {limit}", field=field)
