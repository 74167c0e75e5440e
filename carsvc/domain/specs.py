"""Agent specs as requests give them: the checks a client-given spec passes,
how an AgentRef becomes a spec (inline or registered), and the request checks
every pattern builder shares. The patterns and the services both use these;
nothing here knows a pattern or the wire."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.bounds import DEFAULT_MAX_VALUE_DEPTH, check_struct
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import MAX_TIMEOUT_S
from carsvc.domain.registry import AgentRegistry

AgentRef = patterns_pb2.AgentRef
AgentSpec = types_pb2.AgentSpec

MAX_NAME_CHARS = 256


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits every pattern enforces (configurable on the server)."""

    max_field_bytes: int = 1 << 20
    max_items: int = 100_000
    max_agents: int = 1_000
    max_value_depth: int = DEFAULT_MAX_VALUE_DEPTH


# Resolves an AgentRef (inline spec or registered name) to a spec; `field` names
# the ref in error messages.
Resolver = Callable[[AgentRef, str], AgentSpec]


class AgentResolver:
    """The Resolver of a run request: an inline spec is checked against the
    limits (check_spec_bounds) and used as given; a registered name is the
    registry's spec (NOT_FOUND when there is none)."""

    __slots__ = ("limits", "registry")

    def __init__(self, registry: AgentRegistry, limits: Limits) -> None:
        self.registry = registry
        self.limits = limits

    def __call__(self, ref: AgentRef, field: str) -> AgentSpec:
        source = ref.WhichOneof("source")
        if source == "spec":
            check_spec_bounds(ref.spec, f"{field}.spec", self.limits)
            return ref.spec
        if source == "registered_name":
            return self.registry.get(ref.registered_name, field=f"{field}.registered_name")
        raise InvalidArgument("must give an inline spec or a registered_name", field=field)


# -- one spec --------------------------------------------------------------------------------


def check_spec(spec: AgentSpec, field: str) -> None:
    if not spec.name:
        raise InvalidArgument("must not be empty", field=f"{field}.name")
    if len(spec.name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"is {len(spec.name)} characters; the limit is {MAX_NAME_CHARS}", field=f"{field}.name"
        )
    if any(c.isspace() for c in spec.name):
        raise InvalidArgument(f"'{spec.name}' must not contain whitespace", field=f"{field}.name")
    if spec.HasField("metadata"):
        check_timeout(spec.metadata.fields.get("timeout_secs"), f"{field}.metadata.timeout_secs")


def check_spec_bounds(spec: AgentSpec, field: str, limits: Limits) -> None:
    """check_spec, and every part of a client-given spec within the size and
    nesting limits (what a run request or the registry stores and re-sends)."""
    check_spec(spec, field)
    check_text(spec.system_prompt, f"{field}.system_prompt", limits)
    check_count(len(spec.tools), f"{field}.tools", limits.max_agents, "tools")
    for i, tool in enumerate(spec.tools):
        check_text(tool, f"{field}.tools[{i}]", limits)
    if spec.HasField("metadata"):
        size = spec.metadata.ByteSize()
        if size > limits.max_field_bytes:
            raise InvalidArgument(
                f"is {size} bytes; the limit is {limits.max_field_bytes} (max_field_bytes)", field=f"{field}.metadata"
            )
        check_struct(spec.metadata, f"{field}.metadata", limits.max_value_depth)
    if spec.ByteSize() > limits.max_field_bytes * 2:
        raise InvalidArgument(
            f"is {spec.ByteSize()} bytes in all; the limit is {limits.max_field_bytes * 2} (2 x max_field_bytes)",
            field=field,
        )


def check_timeout(value: struct_pb2.Value | None, field: str) -> None:
    """A spec's `metadata.timeout_secs`, when it is a number, must be finite and
    at most MAX_TIMEOUT_S (zero or less means no deadline of its own)."""
    if value is None or value.WhichOneof("kind") != "number_value":
        return
    seconds = value.number_value
    if not (math.isfinite(seconds) and seconds <= MAX_TIMEOUT_S):
        raise InvalidArgument(
            f"must be a finite number of seconds up to {MAX_TIMEOUT_S:.0f}, not {seconds}", field=field
        )


def copy_spec(spec: AgentSpec, *, name: str = "", add_tools: Sequence[str] = ()) -> AgentSpec:
    """A copy of `spec`, renamed when `name` is given, with `add_tools` granted."""
    copy = AgentSpec()
    copy.CopyFrom(spec)
    if name:
        copy.name = name
    for tool in add_tools:
        if tool not in copy.tools:
            copy.tools.append(tool)
    return copy


# -- the parts of a request ------------------------------------------------------------------


def check_text(value: str, field: str, limits: Limits) -> None:
    size = len(value.encode())
    if size > limits.max_field_bytes:
        raise InvalidArgument(
            f"is {size} bytes; the limit is {limits.max_field_bytes} (max_field_bytes)", field=field
        )


def check_count(count: int, field: str, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidArgument(f"has {count} {what}; the limit is {limit}", field=field)


def require_ref(container: object, name: str, field: str) -> AgentRef:
    """The AgentRef field `name` of `container`, which must be set."""
    if not container.HasField(name):  # type: ignore[attr-defined]
        raise InvalidArgument("is required", field=f"{field}.{name}" if field else name)
    ref: AgentRef = getattr(container, name)
    return ref


def resolve_agents(
    refs: Sequence[AgentRef], field: str, resolve: Resolver, limits: Limits, *, minimum: int = 1
) -> list[AgentSpec]:
    """Resolves a repeated AgentRef field: at least `minimum`, at most
    `limits.max_agents`, and no two with the same name."""
    if len(refs) < minimum:
        what = "one agent" if minimum == 1 else f"{minimum} agents"
        raise InvalidArgument(f"must hold at least {what}", field=field)
    check_count(len(refs), field, limits.max_agents, "agents")
    specs: list[AgentSpec] = []
    seen: dict[str, int] = {}
    for i, ref in enumerate(refs):
        spec = resolve(ref, f"{field}[{i}]")
        if spec.name in seen:
            raise InvalidArgument(
                f"duplicate agent name '{spec.name}' (also {field}[{seen[spec.name]}])", field=f"{field}[{i}]"
            )
        seen[spec.name] = i
        specs.append(spec)
    return specs


def resolve_optional(container: object, name: str, field: str, resolve: Resolver) -> AgentSpec | None:
    """The AgentRef field `name` of `container` resolved, or None when unset."""
    if not container.HasField(name):  # type: ignore[attr-defined]
        return None
    return resolve(getattr(container, name), f"{field}.{name}")


def check_distinct(spec: AgentSpec, others: Sequence[AgentSpec], field: str, what: str) -> None:
    """`spec` (at `field`) must not share its name with any of `others`."""
    for other in others:
        if other.name == spec.name:
            raise InvalidArgument(f"'{spec.name}' must not also be {what}", field=field)
