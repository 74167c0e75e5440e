"""What users import: carsvc.types (the message classes, without the private
carsvc._proto path) and the client's pattern builders refusing a lone string
where a list of strings belongs."""

from __future__ import annotations

import pytest

from carsvc import types
from carsvc._proto.car.v1 import patterns_pb2, runs_pb2, types_pb2
from carsvc.client import adversarial_review, agent, map_reduce


def test_types_re_exports_the_generated_classes() -> None:
    assert types.BudgetLimits is types_pb2.BudgetLimits
    assert types.MapReduceRun is patterns_pb2.MapReduceRun
    assert types.Run is runs_pb2.Run
    assert types.RUN_STATUS_SUCCEEDED == types_pb2.RUN_STATUS_SUCCEEDED
    assert types.RunStatus.Name(types.RUN_STATUS_FAILED) == "RUN_STATUS_FAILED"
    for name in types.__all__:
        assert getattr(types, name) is not None, name
    # Everything of types.proto and patterns.proto, so a new message or enum
    # value in the contract cannot be missing here.
    for module in (types_pb2, patterns_pb2):
        file = module.DESCRIPTOR
        wanted = {*file.message_types_by_name, *file.enum_types_by_name}
        wanted |= {v.name for e in file.enum_types_by_name.values() for v in e.values}
        assert wanted <= set(types.__all__), sorted(wanted - set(types.__all__))
    # Every pattern a run can carry has its message here.
    oneof = runs_pb2.StartRunRequest.DESCRIPTOR.oneofs_by_name["pattern"]
    patterns = {f.message_type.name for f in oneof.fields if f.message_type is not None}
    assert patterns <= set(types.__all__)
    limits = types.BudgetLimits(max_total_tokens=200_000, max_agents=10)
    assert limits.max_total_tokens == 200_000


@pytest.mark.parametrize(
    "build",
    [
        lambda: map_reduce(agent("m"), agent("r"), "t", "abc"),
        lambda: map_reduce(agent("m"), agent("r"), "t", b"abc"),  # type: ignore[arg-type]
        lambda: agent("a", tools="search"),
        lambda: adversarial_review(agent("critic"), "diff", "security"),
    ],
    ids=["items", "items-bytes", "tools", "criteria"],
)
def test_a_lone_string_where_a_list_belongs_is_refused(build: object) -> None:
    assert callable(build)
    with pytest.raises(TypeError, match=r"must be a list of strings, not a (str|bytes) .* one item each\); pass \["):
        build()


def test_lists_tuples_and_generators_of_strings_still_work() -> None:
    assert map_reduce(agent("m"), agent("r"), "t", ["abc"]).items == ["abc"]
    assert map_reduce(agent("m"), agent("r"), "t", ("a", "b")).items == ["a", "b"]
    assert map_reduce(agent("m"), agent("r"), "t", (f"f{i}" for i in range(3))).items == ["f0", "f1", "f2"]
    assert list(agent("a", tools=["search"]).spec.tools) == ["search"]
