"""Fuzzing (issue #8, "Bad input"): hypothesis-generated worker frames and run
requests against a live sidecar.

Worker frames go over raw `WorkerService/Connect` streams with an identity
serializer, so the examples include what no SDK sends: results and calls for
assignments nobody was given (or another session holds), frames before hello,
a second hello, calls with no operation or an operation number the proto does
not have, unknown fields, huge ids and values, frames over max_message_bytes,
bytes that are no ConnectRequest at all, and a worker that hangs up mid-stream.
A model of the documented behaviour (docs/worker-protocol.md) predicts every
FrameError and CallError, in order, and the status a stream ends with.

Run requests (StartRun with every pattern, and Cancel, SubmitDecisions, GetRun,
ListRuns, WatchRun and Session with wrong ids) are random protobuf messages
with huge, empty, negative, NaN, unknown-enum and deeply nested values. Each
gets OK or a clear status (never UNKNOWN or INTERNAL) whose details start with
the field at fault.

Throughout, the sidecar stays SERVING, an unrelated run started before the
first example finishes with the right output on the worker it started on, and
every example runs a second unrelated run in parallel that must succeed too.

Hypothesis runs in a thread (asyncio.to_thread) and hands each example to the
test's event loop (asyncio.run_coroutine_threadsafe): the sidecar, its worker
and the long run keep going between examples, and the test checks them after
the last one. Examples are derandomized, so CI sees the same ones every time;
the @example cases pin each kind of bad input the issue lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import pytest

hypothesis = pytest.importorskip("hypothesis")

from google.protobuf import message_factory, struct_pb2  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402
from google.protobuf.message import DecodeError, Message  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from hypothesis import HealthCheck, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from carsvc._proto.car.v1 import (  # noqa: E402
    budget_pb2,
    budget_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    patterns_pb2,
    registry_pb2,
    runs_pb2,
    types_pb2,
    worker_pb2,
)
from carsvc.client import Client, agent, single  # noqa: E402
from carsvc.config import Settings  # noqa: E402
from carsvc.domain.bounds import struct_depth, value_depth  # noqa: E402
from carsvc.domain.errors import InvalidArgument  # noqa: E402
from carsvc.domain.workers import Dispatcher, check_hello_sizes  # noqa: E402
from carsvc.server import Sidecar  # noqa: E402
from carsvc.services.calls import NEEDS_ANSWER  # noqa: E402
from carsvc.values import to_value  # noqa: E402
from carsvc.worker import AgentContext  # noqa: E402
from tests.conftest import TEST_SETTINGS, Workers  # noqa: E402

T = TypeVar("T")

# Small limits, so "over the limit" is cheap to send.
MAX_MESSAGE = 64 * 1024
MAX_FIELD = 1024
FUZZ_SETTINGS = TEST_SETTINGS.replace(
    max_message_bytes=MAX_MESSAGE, max_field_bytes=MAX_FIELD, heartbeat_interval_ms=1000
)

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
Code: Any = grpc.StatusCode  # grpc is untyped
OK, INVALID, NOT_FOUND, PRECONDITION = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION
EXHAUSTED = Code.RESOURCE_EXHAUSTED
# Statuses that tell the caller what was wrong. UNKNOWN and INTERNAL never do.
CLEAR = frozenset(
    {INVALID, NOT_FOUND, PRECONDITION, EXHAUSTED, Code.PERMISSION_DENIED, Code.ALREADY_EXISTS, Code.OUT_OF_RANGE}
)
# "field: message", the field a path like `single.agent.spec.name` or `map_reduce.items[3]`.
NAMES_FIELD = re.compile(r"^[a-z_]+(\[[0-9]+\])?(\.[a-z_]+(\[[0-9]+\])?)*: \S")

# The well-behaved worker serves these (upper case: no generated name is one of them).
STEADY, ECHO = "STEADY", "ECHO"
SERVED = (STEADY, ECHO)
OWNER = "steady-owner"  # owns the long run; never generated, so nothing can cancel it
CONNECT = "/car.v1.WorkerService/Connect"
HELLO_FIRST = "hello: the first frame must carry hello"
BAD_FRAME = "frame: is not a valid car.v1.ConnectRequest"
BAD_REQUEST = "request: is not a valid car.v1.SessionRequest"
CALL_ID_LIMIT = 256


def code_of(value: int) -> Any:
    """The grpc.StatusCode with the number `value`."""
    return next(c for c in Code if c.value[0] == value)


@pytest.fixture
def settings() -> Settings:
    return FUZZ_SETTINGS


def fuzz(strategy: st.SearchStrategy[T], max_examples: int, *examples: T) -> Callable[[Callable[[T], None]], None]:
    """Runs a function on `max_examples` derandomized examples of `strategy`
    plus the explicit `examples` (hypothesis is driven from the calling thread)."""

    def run(fn: Callable[[T], None]) -> None:
        test: Any = given(strategy)(fn)
        for e in examples:
            test = example(e)(test)
        hypothesis.settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            print_blob=False,
            suppress_health_check=list(HealthCheck),
        )(test)()

    return run


async def drive(
    strategy: st.SearchStrategy[T],
    body: Callable[[T], Coroutine[Any, Any, None]],
    max_examples: int,
    *examples: T,
) -> None:
    """Runs `body` on this event loop for every example hypothesis draws: the
    engine runs in a thread, each example is run on the loop in turn."""
    loop = asyncio.get_running_loop()

    def one(case: T) -> None:
        asyncio.run_coroutine_threadsafe(body(case), loop).result()

    await asyncio.to_thread(fuzz(strategy, max_examples, *examples), one)


# -- the protobuf wire format, for frames no generated code would write --------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(payload)) + payload


def unknown_field(number: int, wire_type: int, value: bytes) -> bytes:
    if wire_type == 0:
        return tag(number, 0) + varint(int.from_bytes(value[:8], "little"))
    if wire_type == 1:
        return tag(number, 1) + value[:8].ljust(8, b"\0")
    if wire_type == 5:
        return tag(number, 5) + value[:4].ljust(4, b"\0")
    return field(number, value)


def padded(size: int) -> bytes:
    """A heartbeat frame of exactly `size` bytes (padded with an unknown field)."""
    head = field(4, b"")  # heartbeat {}
    pad_tag = tag(1000, 2)
    for length in range(size - len(head) - len(pad_tag), 0, -1):
        if len(head) + len(pad_tag) + len(varint(length)) + length == size:
            return head + pad_tag + varint(length) + b"p" * length
    raise AssertionError(size)


def nested_value(depth: int) -> bytes:
    """A google.protobuf.Value `depth` lists deep (deeper than the parser allows)."""
    value = field(3, b"x")  # string_value
    for _ in range(depth):
        value = field(6, field(1, value))  # list_value { values: value }
    return value


# Bytes that are not a ConnectRequest, each a different way to be malformed.
MALFORMED = {
    "truncated": field(2, worker_pb2.AssignmentResult(assignment_id="t", attempt=1).SerializeToString())[:-1],
    "bad_utf8": field(1, field(1, b"\xff\xfe")),  # hello.worker_id
    "too_deep": field(3, field(2, b"a") + field(11, field(1, b"k") + field(2, nested_value(120)))),
    "bad_length": tag(2, 2) + varint(1000) + b"x",
    "field_zero": b"\x00\x01",
    "lone_end_group": tag(1, 4),
    "endless_varint": tag(5, 0) + b"\xff" * 11,
}


def decodes(data: bytes) -> worker_pb2.ConnectRequest | None:
    try:
        return worker_pb2.ConnectRequest.FromString(data)
    except DecodeError:
        return None


def _serves_ours(data: bytes) -> bool:
    """Whether `data` is a hello that would take the well-behaved worker's agents."""
    frame = decodes(data)
    return frame is not None and any(
        fnmatch.fnmatchcase(name, pattern) for pattern in frame.hello.agents for name in SERVED
    )


# -- random protobuf messages --------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each as likely as its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


TEXT = st.one_of(
    st.sampled_from(["", "x", "t", " ", "a b", "é", "🙂", "\x00", "\n"]),
    st.text(max_size=12),
    st.sampled_from([MAX_FIELD, MAX_FIELD + 1, 5 * MAX_FIELD]).map(lambda n: "h" * n),
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**53), 2**53), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=12,
)


def json_value(obj: Any) -> struct_pb2.Value:
    """A Value from JSON-shaped data; unlike carsvc.values.to_value, NaN and the
    infinities go through (the wire carries them)."""
    value = struct_pb2.Value()
    if isinstance(obj, float):
        value.number_value = obj
    elif isinstance(obj, list):
        value.list_value.SetInParent()
        for item in obj:
            value.list_value.values.add().CopyFrom(json_value(item))
    elif isinstance(obj, dict):
        value.struct_value.SetInParent()
        for key, item in obj.items():
            value.struct_value.fields[key].CopyFrom(json_value(item))
    else:
        value.CopyFrom(to_value(obj))
    return value


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


# Nested as deep as a request may be and still parse on both ends.
JSON_VALUES = st.one_of(JSON, st.integers(1, 30).map(_deep))
UINT32 = st.one_of(st.sampled_from([0, 1, 2, 2**31 - 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.sampled_from([0, 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
INT32 = st.one_of(st.sampled_from([0, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
INT64 = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
DOUBLES = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, 0.5, 1e-300, 1e300, 9.3e12, float("inf"), float("-inf"), float("nan")]),
    st.floats(),
)
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=16),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_DOUBLE: DOUBLES,
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
}

VALID_NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True)
AGENT_NAMES = st.one_of(
    VALID_NAMES, st.sampled_from(["", " ", "a b", "tab\there", "n" * 257, "é", "mapper*"]), TEXT
).filter(lambda name: name not in SERVED)
REGISTERED = "fz-registered"


def message_class(descriptor: Any) -> type[Message]:
    assert descriptor is not None
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def is_repeated(f: Any) -> bool:
    # protobuf 5 has `label`; its type stubs know only protobuf 6's `is_repeated`.
    return bool(getattr(f, "label", None) == FieldDescriptor.LABEL_REPEATED)


def is_map(f: Any) -> bool:
    return bool(f.message_type is not None and f.message_type.GetOptions().map_entry)


@st.composite
def messages(draw: st.DrawFn, cls: type[Message], depth: int = 0, generic: bool = False) -> Message:
    """A random `cls`: each field set or not, to a boundary or random value; enums
    may hold values the proto does not define; AgentRefs are usually usable."""
    name = cls.DESCRIPTOR.full_name
    if name == "google.protobuf.Value":
        return json_value(draw(JSON_VALUES))
    if name == "google.protobuf.Struct":
        struct = struct_pb2.Struct()
        keys = st.sampled_from(["timeout_secs", "k", ""])
        for key, item in draw(st.dictionaries(keys, JSON_VALUES, max_size=3)).items():
            struct.fields[key].CopyFrom(json_value(item))
        if draw(st.booleans()):  # the one metadata key the sidecar reads
            struct.fields["timeout_secs"].number_value = draw(DOUBLES)
        return struct
    if name == "car.v1.AgentRef" and not generic:
        ref: patterns_pb2.AgentRef = draw(
            weighted(
                (4, VALID_NAMES.map(lambda n: patterns_pb2.AgentRef(spec=types_pb2.AgentSpec(name=n)))),
                (1, st.sampled_from([REGISTERED, "ghost", "", "a b"]).map(
                    lambda n: patterns_pb2.AgentRef(registered_name=n)
                )),
                (1, messages(patterns_pb2.AgentRef, depth, generic=True)),
            )
        )
        return ref
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        # Agents are set more often than not, so most requests get past "is required".
        likely = f.message_type is not None and f.message_type.full_name == "car.v1.AgentRef"
        if draw(st.integers(0, 9)) >= (8 if likely else 5):
            continue
        repeated = is_repeated(f)
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = message_class(f.message_type)
            if is_map(f):
                entry = sub.DESCRIPTOR
                key_type, value_type = entry.fields_by_name["key"].type, entry.fields_by_name["value"].type
                entries = draw(st.dictionaries(SCALARS[key_type], SCALARS[value_type], max_size=3))
                getattr(msg, f.name).update(entries)
            elif depth >= 4:
                continue
            elif repeated:
                for item in draw(st.lists(messages(sub, depth + 1), max_size=3)):
                    getattr(msg, f.name).add().CopyFrom(item)
            else:
                target = getattr(msg, f.name)
                target.SetInParent()
                target.MergeFrom(draw(messages(sub, depth + 1)))
            continue
        values: st.SearchStrategy[Any]
        if f.type == FieldDescriptor.TYPE_ENUM:
            assert f.enum_type is not None
            values = weighted((4, st.sampled_from([v.number for v in f.enum_type.values])), (1, st.integers(-3, 40)))
        elif (name, f.name) == ("car.v1.AgentSpec", "name"):
            values = AGENT_NAMES
        else:
            values = SCALARS[f.type]
        if repeated:
            getattr(msg, f.name).extend(draw(st.lists(values, max_size=4)))
        else:
            setattr(msg, f.name, draw(values))
    return msg


# -- shared checks ------------------------------------------------------------------------------


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing failed inside the sidecar: no error was logged (a servicer that
    raised, a task whose exception nobody retrieved, a run that crashed)."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()}" for r in errors)


async def assert_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "car.v1.WorkerService", "car.v1.RunService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def assert_clear(err: grpc.aio.AioRpcError, what: str, *, oversize: bool = False) -> None:
    """A refusal the caller can act on: a clear status and details naming the field."""
    details = err.details() or ""
    assert err.code() in CLEAR, f"{what}: {err.code()} {details!r}"
    if oversize:
        assert err.code() == EXHAUSTED and "larger than max" in details, f"{what}: {err.code()} {details!r}"
    else:
        assert NAMES_FIELD.match(details), f"{what}: {err.code()} {details!r}"


class Unrelated:
    """The runs that must not notice the fuzzing: a long one held on the
    well-behaved worker for the whole test, and a quick one per example."""

    def __init__(self, client: Client, workers: Workers) -> None:
        self.client = client
        self.workers = workers
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.steady: AgentContext | None = None
        self.echoed: list[str] = []  # assignment ids of finished echo agents
        self.pings = 0

    async def start(self) -> runs_pb2.Run:
        async def steady(ctx: AgentContext) -> str:
            self.steady = ctx
            self.held.set()
            await self.release.wait()
            return f"steady: {ctx.task}"

        async def echo(ctx: AgentContext) -> str:
            self.echoed.append(ctx.assignment_id)
            return f"echo: {ctx.task}"

        await self.workers.start({STEADY: steady, ECHO: echo}, worker_id="well-behaved", max_in_flight=8)
        handle = await self.client.start_run(
            single(agent(STEADY), "long haul"), agent_id=OWNER, thread_id="steady-thread"
        )
        await asyncio.wait_for(self.held.wait(), 10)
        await self.ping()
        return await self.client.get_run(handle.run_id)

    @property
    def steady_id(self) -> str:
        assert self.steady is not None
        return self.steady.assignment_id

    async def ping(self) -> None:
        """A quick unrelated run; it must succeed with its own answer."""
        self.pings += 1
        task = f"ping {self.pings}"
        run = await self.client.run(single(agent(ECHO), task))
        assert run.status == SUCCEEDED, run
        assert run.result.single.output.answer == f"echo: {task}"

    async def finish(self, run_id: str) -> None:
        """Releases the long run: it ends on its first attempt with its own answer."""
        self.release.set()
        run = await asyncio.wait_for(self.client.wait(run_id), 10)
        assert run.status == SUCCEEDED, run
        assert run.result.single.output.answer == "steady: long haul"
        async for event in self.client.watch(run_id):
            assert event.WhichOneof("kind") != "agent_redispatched", event
            if event.WhichOneof("kind") == "agent_finished":
                assert (event.agent_finished.worker_id, event.agent_finished.attempt) == ("well-behaved", 1)


# == 1. worker frames ================================================================================


@dataclass(frozen=True)
class Hello:
    worker_id: str
    agents: tuple[str, ...]
    max_in_flight: int = 0
    sdk: str = ""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Call:
    call_id: str
    assignment: str  # an id, or one of the ID tokens
    op: str | None  # a RuntimeCall op, None for none, or UNKNOWN_OP
    arg: Message | None = None
    unknown_number: int = 99


@dataclass(frozen=True)
class Result:
    assignment: str
    attempt: int
    output: types_pb2.AgentOutput | None = None


@dataclass(frozen=True)
class Frame:
    """A ConnectRequest; `extra` is hand-encoded fields appended on the wire."""

    hello: Hello | None = None
    heartbeat: bool = False
    calls: tuple[Call, ...] = ()
    results: tuple[Result, ...] = ()
    extra: bytes = b""


@dataclass(frozen=True)
class Raw:
    """Arbitrary bytes (usually no ConnectRequest)."""

    data: bytes


@dataclass(frozen=True)
class Malformed:
    kind: str  # a key of MALFORMED


@dataclass(frozen=True)
class Sized:
    """A heartbeat padded to exactly `size` bytes (over max_message_bytes or not)."""

    size: int


@dataclass(frozen=True)
class Flood:
    """One frame of `count` empty fire-and-forget calls: as many FrameErrors."""

    count: int


@dataclass(frozen=True)
class HangUp:
    """The worker cancels its stream."""


Step = Frame | Raw | Malformed | Sized | Flood | HangUp

# Assignment ids, resolved when the frame is sent.
NO_SUCH, HELD_ELSEWHERE, FINISHED, HUGE_ID = "<no-such>", "<held-elsewhere>", "<finished>", "<huge>"
ID_TOKENS = (NO_SUCH, HELD_ELSEWHERE, FINISHED, HUGE_ID, "", "é\x00🙂")
UNKNOWN_OP = "<unknown-op>"
OPS = tuple(f.name for f in worker_pb2.RuntimeCall.DESCRIPTOR.oneofs_by_name["op"].fields)
OP_NUMBERS = frozenset(f.number for f in worker_pb2.RuntimeCall.DESCRIPTOR.fields)

RAW_AGENT_NAMES = st.one_of(
    st.from_regex(r"fz-raw-[a-z0-9*?]{0,6}", fullmatch=True),
    st.sampled_from(["fz-raw", "fz-raw-[0-9]", "", " ", "a b", "fz-raw\u2003", "fz-raw-" + "n" * 3000]),
)
HELLOS = st.builds(
    Hello,
    worker_id=st.one_of(st.sampled_from(["", "fz-w", "é🙂", "w" * 5000]), st.text(max_size=8)),
    agents=st.lists(RAW_AGENT_NAMES, max_size=3).map(tuple),
    max_in_flight=UINT32,
    sdk=st.text(max_size=8),
    labels=st.lists(st.tuples(st.text(max_size=4), TEXT), max_size=2).map(tuple),
)
IDS = st.one_of(st.sampled_from(ID_TOKENS), st.text(max_size=10))


@st.composite
def calls(draw: st.DrawFn) -> Call:
    call_id = draw(
        weighted(
            (6, st.sampled_from(["", "c1", "c2"])), (2, st.text(max_size=6)), (1, st.just("C" * (CALL_ID_LIMIT + 1)))
        )
    )
    op = draw(weighted((1, st.none()), (6, st.sampled_from(OPS)), (1, st.just(UNKNOWN_OP))))
    if op is None:
        return Call(call_id, draw(IDS), None)
    if op == UNKNOWN_OP:
        number = draw(st.one_of(st.integers(3, 9), st.integers(22, 2**29 - 1)).filter(lambda n: n not in OP_NUMBERS))
        return Call(call_id, draw(IDS), op, None, number)
    arg_type = message_class(worker_pb2.RuntimeCall.DESCRIPTOR.fields_by_name[op].message_type)
    return Call(call_id, draw(IDS), op, draw(messages(arg_type)))


RESULTS = st.builds(
    Result,
    assignment=IDS,
    attempt=st.one_of(st.sampled_from([0, 1, 2, 2**32 - 1]), UINT32),
    output=st.one_of(st.none(), messages(types_pb2.AgentOutput)),
)
EXTRAS = st.one_of(
    st.just(b""),
    st.sampled_from([tag(4, 0) + varint(1), tag(1, 0) + varint(7), field(2, b"")]),  # known fields, wrong wire types
    st.builds(
        unknown_field, st.integers(5, 2**29 - 1), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=12)
    ),
)
VALID_HELLOS = st.builds(
    Hello,
    worker_id=st.one_of(st.just("fz-w"), st.text(min_size=1, max_size=8), st.just("w" * 5000)),
    agents=st.lists(st.from_regex(r"fz-raw(-[a-z0-9*?]{1,6})?", fullmatch=True), min_size=1, max_size=3).map(tuple),
    max_in_flight=UINT32,
)


def frames(hellos: st.SearchStrategy[Hello | None]) -> st.SearchStrategy[Frame]:
    return st.builds(
        Frame,
        hello=hellos,
        heartbeat=st.booleans(),
        calls=st.lists(calls(), max_size=3).map(tuple),
        results=st.lists(RESULTS, max_size=3).map(tuple),
        extra=EXTRAS,
    )


# Later frames: mostly well-formed ConnectRequests, now and then a hello again,
# bytes that are none, a frame at or over the size limit, a flood, a hang-up.
LATER_STEPS: st.SearchStrategy[Step] = weighted(
    (12, frames(weighted((6, st.none()), (1, HELLOS)))),
    (2, st.builds(Raw, st.binary(max_size=40))),
    (1, st.builds(Malformed, st.sampled_from(sorted(MALFORMED)))),
    (1, st.builds(Sized, st.sampled_from([MAX_MESSAGE, MAX_MESSAGE + 1, 2 * MAX_MESSAGE]))),
    (1, st.builds(Flood, st.integers(1, (MAX_MESSAGE - 16) // 2))),
    (1, st.just(HangUp())),
)
# The first frame: usually a hello that opens a session, else anything.
FIRST_STEPS: st.SearchStrategy[Step] = weighted(
    (6, frames(VALID_HELLOS)),
    (1, frames(st.one_of(st.none(), HELLOS))),
    (1, LATER_STEPS.filter(lambda step: not (isinstance(step, Raw) and _serves_ours(step.data)))),
)
STEPS: st.SearchStrategy[list[Step]] = st.just([]) | st.builds(
    lambda first, later: [first, *later], FIRST_STEPS, st.lists(LATER_STEPS, max_size=6)
)


def step_list(*steps: Step) -> list[Step]:
    return list(steps)


HELLO = Frame(hello=Hello("fz-w", ("fz-raw",)))
WORKER_EXAMPLES = [
    step_list(),  # open and close
    step_list(Frame(heartbeat=True)),  # heartbeat before hello
    step_list(Frame(results=(Result(NO_SUCH, 1),))),  # result before hello
    step_list(Frame()),  # an empty first frame
    step_list(Frame(hello=Hello("", ("fz-raw",)))),  # hello without worker_id
    step_list(Frame(hello=Hello("fz-w", ()))),  # hello without agents
    step_list(Frame(hello=Hello("fz-w", ("fz-raw", "a b")))),  # a bad agent name
    step_list(HELLO, HELLO, Frame(hello=Hello("", ()))),  # second (and third, invalid) hello
    step_list(HELLO, Frame(results=(Result(NO_SUCH, 1), Result(NO_SUCH, 0), Result("", 2**32 - 1)))),
    step_list(HELLO, Frame(results=(Result(HELD_ELSEWHERE, 1, types_pb2.AgentOutput(answer="stolen")),))),
    step_list(HELLO, Frame(results=(Result(FINISHED, 1, types_pb2.AgentOutput(answer="late")),))),
    step_list(
        HELLO,
        Frame(calls=(Call("c1", HELD_ELSEWHERE, "state_get", worker_pb2.StateGetCall(key="k")),)),
        Frame(calls=(Call("", HELD_ELSEWHERE, "emit", worker_pb2.EmitEventCall(kind="k")),)),
    ),
    step_list(HELLO, Frame(calls=(Call("c1", NO_SUCH, None), Call("", NO_SUCH, None)))),  # empty oneof
    step_list(HELLO, Frame(calls=(Call("c1", HELD_ELSEWHERE, UNKNOWN_OP), Call("", "", UNKNOWN_OP, None, 5)))),
    step_list(HELLO, Frame(calls=(Call("C" * (CALL_ID_LIMIT + 1), NO_SUCH, "state_keys"),))),
    step_list(HELLO, Frame(results=(Result(HUGE_ID, 1),), calls=(Call("c", HUGE_ID, "state_keys"),))),
    step_list(HELLO, Frame(extra=unknown_field(77, 2, b"future"), heartbeat=True)),
    step_list(Frame(hello=Hello("fz-w", ("fz-raw",)), calls=(Call("c", NO_SUCH, None),), extra=tag(4, 0) + b"\x01")),
    step_list(HELLO, Sized(MAX_MESSAGE), Sized(MAX_MESSAGE + 1)),  # at the limit, then over it
    step_list(Sized(2 * MAX_MESSAGE)),
    step_list(HELLO, Flood((MAX_MESSAGE - 16) // 2)),  # 32k FrameErrors, far more than one frame holds
    step_list(Raw(b"\xff\xff\xff")),
    step_list(HELLO, Raw(b"\xff\xff\xff")),
    *(step_list(HELLO, Malformed(kind)) for kind in sorted(MALFORMED)),
    step_list(Malformed("too_deep")),
    step_list(HELLO, Frame(heartbeat=True), HangUp()),
]


@dataclass
class Replies:
    """The FrameErrors (code, field) and CallErrors (call id, code, field) a frame earns."""

    errors: list[tuple[int, str]]
    answers: list[tuple[str, int, str]]

    def extend(self, other: Replies) -> None:
        self.errors.extend(other.errors)
        self.answers.extend(other.answers)


@dataclass(frozen=True)
class Ends:
    """The stream ends with this status."""

    code: Any  # a grpc.StatusCode
    details: str  # what the details start with (or contain, for transport errors)


def hello_problem(frame: worker_pb2.ConnectRequest) -> Ends | None:
    """How the sidecar refuses a first frame (docs/worker-protocol.md), if it does."""
    if not frame.HasField("hello"):
        return Ends(INVALID, HELLO_FIRST)
    hello = frame.hello
    if not hello.worker_id:
        return Ends(INVALID, "hello.worker_id: ")
    if not hello.agents:
        return Ends(INVALID, "hello.agents: ")
    try:  # lengths and counts (a 5,000-character worker_id is too long)
        check_hello_sizes(hello.worker_id, list(hello.agents), dict(hello.labels), hello.sdk)
    except InvalidArgument as err:
        return Ends(INVALID, f"{err.field}: ")
    for i, name in enumerate(hello.agents):
        if not name or any(c.isspace() for c in name):
            return Ends(INVALID, f"hello.agents[{i}]: ")
    return None


def result_reply(dispatcher: Dispatcher, assignment_id: str, attempt: int) -> tuple[int, str]:
    """The FrameError (code, field under results[i]) a session that does not hold
    `assignment_id` gets for a result of `attempt`: docs/worker-protocol.md."""
    active, done = dispatcher.active(assignment_id), dispatcher.finished(assignment_id)
    if active is None and done is None:
        return NOT_FOUND.value[0], "assignment_id"
    current = active.attempt if active is not None else done.attempt if done is not None else 0
    if attempt < current:
        return PRECONDITION.value[0], "attempt"  # superseded
    if attempt > current:
        return INVALID.value[0], "attempt"  # never handed out
    return PRECONDITION.value[0], "assignment_id"  # held elsewhere, or already finished


def expected_replies(
    frame: worker_pb2.ConnectRequest, first: bool, reply: Callable[[str, int], tuple[int, str]]
) -> Replies:
    """What a session that holds no assignment answers to `frame`: the
    "errors that never end a session" table of docs/worker-protocol.md."""
    out = Replies([], [])
    if not first and frame.HasField("hello"):
        out.errors.append((INVALID.value[0], "hello"))
    for i, call in enumerate(frame.calls):
        at = f"calls[{i}]"
        if len(call.call_id) > CALL_ID_LIMIT:
            out.errors.append((INVALID.value[0], f"{at}.call_id"))
            continue
        if call.WhichOneof("op") is None:
            code, where = INVALID, f"{at}.op"
        elif not call.call_id and call.WhichOneof("op") in NEEDS_ANSWER:
            code, where = INVALID, f"{at}.call_id"  # its answer is the point: not made
        else:
            code, where = PRECONDITION, f"{at}.assignment_id"
        if call.call_id:
            out.answers.append((call.call_id, code.value[0], where))
        else:
            out.errors.append((code.value[0], where))
    for i, result in enumerate(frame.results):
        if result.attempt == 0:
            out.errors.append((INVALID.value[0], f"results[{i}].attempt"))
        else:
            code, where = reply(result.assignment_id, result.attempt)
            out.errors.append((code, f"results[{i}].{where}"))
    return out


class RawWorker:
    """A WorkerService/Connect stream that writes bytes as given."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        connect = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=worker_pb2.ConnectResponse.FromString
        )
        self.call = connect()

    async def write(self, data: bytes) -> bool:
        """False when the stream has already ended."""
        try:
            await self.call.write(data)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return False
        return True

    async def read(self) -> worker_pb2.ConnectResponse | None:
        """The next frame; None at the end of a stream that ended OK."""
        frame = await asyncio.wait_for(self.call.read(), 10)
        if frame is grpc.aio.EOF:
            return None
        assert isinstance(frame, worker_pb2.ConnectResponse)
        assert frame.ByteSize() <= MAX_MESSAGE
        return frame

    async def ending(self) -> Ends:
        """How the stream ends; it must send nothing more before that."""
        try:
            frame = await self.read()
        except grpc.aio.AioRpcError as err:
            return Ends(err.code(), err.details() or "")
        assert frame is None, f"unexpected frame {frame}"
        return Ends(OK, "")


class WorkerFuzz:
    def __init__(self, sidecar: Sidecar, client: Client, unrelated: Unrelated) -> None:
        self.sidecar = sidecar
        self.client = client
        self.unrelated = unrelated
        self.sentinels = 0

    def result_reply(self, assignment_id: str, attempt: int) -> tuple[int, str]:
        return result_reply(self.sidecar.dispatcher, assignment_id, attempt)

    def resolve(self, token: str) -> str:
        if token == NO_SUCH:
            return "fz-no-such-assignment"
        if token == HELD_ELSEWHERE:
            return self.unrelated.steady_id
        if token == FINISHED:
            return self.unrelated.echoed[0]
        if token == HUGE_ID:
            return "i" * (MAX_MESSAGE // 4)
        return token

    def encode(self, step: Step) -> bytes:
        if isinstance(step, Raw):
            return step.data
        if isinstance(step, Malformed):
            data = MALFORMED[step.kind]
            assert decodes(data) is None, step
            return data
        if isinstance(step, Sized):
            return padded(step.size)
        if isinstance(step, Flood):
            return field(3, b"") * step.count
        assert isinstance(step, Frame), step
        base = worker_pb2.ConnectRequest()
        if step.hello is not None:
            h = step.hello
            base.hello.CopyFrom(
                worker_pb2.WorkerHello(
                    worker_id=h.worker_id, agents=h.agents, max_in_flight=h.max_in_flight, sdk=h.sdk,
                    labels=dict(h.labels),
                )
            )
        if step.heartbeat:
            base.heartbeat.SetInParent()
        for r in step.results:
            result = base.results.add(assignment_id=self.resolve(r.assignment), attempt=r.attempt)
            if r.output is not None:
                result.output.CopyFrom(r.output)
        data = base.SerializeToString()
        for c in step.calls:
            call = worker_pb2.RuntimeCall(call_id=c.call_id, assignment_id=self.resolve(c.assignment))
            if c.op is not None and c.op != UNKNOWN_OP:
                getattr(call, c.op).SetInParent()
                if c.arg is not None:
                    getattr(call, c.op).MergeFrom(c.arg)
            encoded = call.SerializeToString()
            if c.op == UNKNOWN_OP:  # an op case this proto does not know
                encoded += field(c.unknown_number, b"\x0a\x01k")
            data += field(3, encoded)
        return data + step.extra

    async def sync(self, raw: RawWorker, pending: Replies) -> None:
        """Sends a frame whose error is known to come last, and checks that
        exactly the `pending` replies came before it."""
        self.sentinels += 1
        sentinel = f"fz-sentinel-{self.sentinels}"
        assert await raw.write(
            worker_pb2.ConnectRequest(results=[worker_pb2.AssignmentResult(assignment_id=sentinel, attempt=1)])
            .SerializeToString()
        ), "the stream ended early"
        pending.errors.append((NOT_FOUND.value[0], "results[0].assignment_id"))
        got = Replies([], [])
        done = False
        while not done:
            frame = await raw.read()
            assert frame is not None, "the stream ended early"
            assert not (frame.HasField("welcome") or frame.assignments or frame.cancels or frame.HasField("drain"))
            for error in frame.errors:
                # It names the field, and echoes no more than a bit of what it was sent.
                assert error.message and error.field and len(error.message) < 1024, error
                got.errors.append((error.code, error.field))
                done = error.message == f"unknown assignment '{sentinel}'"
            for answer in frame.call_results:
                assert answer.WhichOneof("result") == "error" and len(answer.error.message) < 1024, answer
                where = answer.error.message.split(": ", 1)[0]
                assert answer.error.message.startswith(f"{where}: ") and len(answer.error.message) > len(where) + 2
                got.answers.append((answer.call_id, answer.error.code, where))
        assert got == pending
        pending.errors.clear()
        pending.answers.clear()

    async def play(self, steps: list[Step]) -> str:
        """Plays `steps` on a new stream; returns its session id ("" if none)."""
        raw = RawWorker(self.client.channel)
        try:
            return await self._play(raw, steps)
        finally:
            raw.call.cancel()  # a no-op once the stream has ended

    async def _play(self, raw: RawWorker, steps: list[Step]) -> str:
        session_id = ""
        pending = Replies([], [])
        for step in steps:
            if isinstance(step, HangUp):
                raw.call.cancel()
                return session_id
            data = self.encode(step)
            frame = decodes(data)
            ends: Ends | None = None
            if len(data) > MAX_MESSAGE:
                ends = Ends(EXHAUSTED, "larger than max")
            elif frame is None:
                ends = Ends(INVALID, BAD_FRAME)
            elif not session_id:
                ends = hello_problem(frame)
            if ends is not None:
                if session_id:
                    await self.sync(raw, pending)
                await raw.write(data)
                got = await raw.ending()
                assert got.code == ends.code, (step, got)
                if ends.code == EXHAUSTED:
                    assert ends.details in got.details, (step, got)
                else:
                    assert got.details.startswith(ends.details), (step, got)
                return session_id
            assert frame is not None
            assert await raw.write(data), f"the stream ended early: {await raw.ending()}"
            first = not session_id
            if first:
                reply = await raw.read()
                assert reply is not None and reply.HasField("welcome"), reply
                welcome = reply.welcome
                assert welcome.session_id
                assert welcome.max_in_flight == (frame.hello.max_in_flight or 1)
                assert welcome.heartbeat_interval_ms == FUZZ_SETTINGS.heartbeat_interval_ms
                assert welcome.max_message_bytes == MAX_MESSAGE
                session_id = welcome.session_id
            pending.extend(expected_replies(frame, first, self.result_reply))
        if session_id:
            await self.sync(raw, pending)
        await raw.call.done_writing()
        assert await raw.ending() == Ends(OK, "")
        return session_id

    async def example(self, steps: list[Step]) -> None:
        async with asyncio.timeout(30):
            played, _ = await asyncio.gather(self.play(steps), self.unrelated.ping())
            await assert_serving(self.client.channel)
            # The session is gone, and with it nothing else.
            while played in self.sidecar.dispatcher.sessions:
                await asyncio.sleep(0.01)
            assert [s.worker_id for s in self.sidecar.dispatcher.sessions.values()] == ["well-behaved"]


async def test_fuzzed_worker_frames(
    client: Client, workers: Workers, sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    unrelated = Unrelated(client, workers)
    steady = await unrelated.start()
    fuzz = WorkerFuzz(sidecar, client, unrelated)
    await drive(STEPS, fuzz.example, 60, *WORKER_EXAMPLES)
    await unrelated.finish(steady.run_id)
    await assert_serving(client.channel)
    assert_no_errors_logged(caplog)


# -- a raw worker that holds an assignment: random runtime calls, wrong attempts ------------------

HELD_AGENT = "fz-held"
HELD = "<held>"
QUICK_OPS = ("state_get", "state_set", "state_delete", "state_keys", "mailbox_send", "emit", "progress")
ANSWER_KIND = {
    "state_get": "state_get",
    "state_set": "state_write",
    "state_delete": "state_write",
    "state_keys": "state_keys",
    "mailbox_send": "ack",
    "emit": "ack",
    "progress": "ack",
    "mailbox_recv": "message",
    "delegate": "agent_output",
    "spawn_subtask": "agent_output",
    "consult_advisor": "consultation",
    "suspend_tool_call": "decision",
}
# A call's own failure may also be a mailbox receive that timed out.
CALL_CODES = frozenset(c.value[0] for c in CLEAR | {Code.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class Held:
    calls: tuple[Call, ...]
    wrong_attempts: tuple[int, ...]  # results for the held assignment with these attempts, first
    output: types_pb2.AgentOutput  # merged into the real result's output
    together: bool  # the calls travel in the frame that carries the result


HELD_CALLS = st.lists(
    weighted((6, calls().map(lambda c: Call(c.call_id, HELD, c.op, c.arg, c.unknown_number))), (1, calls())),
    max_size=6,
).map(tuple)
HELD_CASES = st.builds(
    Held,
    calls=HELD_CALLS,
    wrong_attempts=st.lists(st.sampled_from([0, 2, 7, 2**32 - 1]), max_size=2).map(tuple),
    output=messages(types_pb2.AgentOutput),
    together=st.booleans(),
)


def _held(*calls: Call, wrong: tuple[int, ...] = (), together: bool = False) -> Held:
    return Held(calls, wrong, types_pb2.AgentOutput(), together)


def _send(to: str) -> worker_pb2.MailboxSendCall:
    return worker_pb2.MailboxSendCall(message=types_pb2.Message(to_agent=to))


_VALUE = struct_pb2.Value(string_value="v")
HELD_EXAMPLES = [
    _held(),
    _held(
        Call("set", HELD, "state_set", worker_pb2.StateSetCall(key="k", value=_VALUE)),
        Call("get", HELD, "state_get", worker_pb2.StateGetCall(key="k")),
        Call("keys", HELD, "state_keys", worker_pb2.StateKeysCall()),
        Call("del", HELD, "state_delete", worker_pb2.StateDeleteCall(key="k")),
        Call("big", HELD, "state_set", worker_pb2.StateSetCall(key="k", value=json_value("x" * (MAX_FIELD + 1)))),
        together=True,
    ),
    _held(
        Call("to-self", HELD, "mailbox_send", _send(HELD_AGENT)),
        Call("to-ghost", HELD, "mailbox_send", _send("ghost")),
        Call("recv", HELD, "mailbox_recv", worker_pb2.MailboxRecvCall(timeout_ms=1)),
        Call("recv-late", HELD, "mailbox_recv", worker_pb2.MailboxRecvCall(timeout_ms=1)),
    ),
    _held(
        Call("nan", HELD, "progress", worker_pb2.ProgressCall(message="m", fraction=float("nan"))),
        Call("", HELD, "emit", worker_pb2.EmitEventCall(kind="")),
        Call("suspend", HELD, "suspend_tool_call", worker_pb2.SuspendToolCall(tool_call_id="t", timeout_ms=1)),
        Call("delegate", HELD, "delegate", worker_pb2.DelegateCall(specialist="x", subtask="y")),
        Call("", HELD, "spawn_subtask", worker_pb2.SpawnSubtaskCall(task="t")),
        wrong=(0, 2, 2**32 - 1),
    ),
]


def refused(output: types_pb2.AgentOutput, settings: Settings) -> bool:
    """Whether the sidecar refuses `output` (docs/worker-protocol.md, "Outputs are bounded")."""
    if output.ByteSize() > settings.max_output_bytes:
        return True
    depths = [value_depth(e.data) for e in output.outcome.evidence if e.HasField("data")]
    if output.outcome.HasField("metrics"):
        depths.append(struct_depth(output.outcome.metrics))
    return max(depths, default=0) > settings.max_value_depth


class HeldFuzz(WorkerFuzz):
    held_id = ""

    def resolve(self, token: str) -> str:
        return self.held_id if token == HELD else super().resolve(token)

    def check(self, frame: worker_pb2.ConnectResponse, calls: dict[str, tuple[int, worker_pb2.RuntimeCall]],
              answered: dict[str, worker_pb2.CallResult]) -> None:
        """Every answer is to a call that asked, once, of the right kind or a clear error."""
        assert not (frame.HasField("welcome") or frame.cancels or frame.HasField("drain")), frame
        for error in frame.errors:
            assert code_of(error.code) in CLEAR and error.message and error.field, error
        for answer in frame.call_results:
            assert answer.call_id in calls and answer.call_id not in answered, answer
            answered[answer.call_id] = answer
            _, call = calls[answer.call_id]
            if answer.WhichOneof("result") == "error":
                failed = answer.error
                assert failed.code in CALL_CODES and failed.message, answer
                # A field at fault is named (a receive that timed out has none).
                assert failed.code == Code.DEADLINE_EXCEEDED.value[0] or NAMES_FIELD.match(failed.message), answer
            else:
                assert call.assignment_id == self.held_id, (call, answer)
                assert answer.WhichOneof("result") == ANSWER_KIND[call.WhichOneof("op") or ""], (call, answer)

    async def example_held(self, case: Held) -> None:
        async with asyncio.timeout(30):
            await asyncio.gather(self.play_held(case), self.unrelated.ping())
            await assert_serving(self.client.channel)

    async def play_held(self, case: Held) -> None:
        raw = RawWorker(self.client.channel)
        try:
            assert await raw.write(
                worker_pb2.ConnectRequest(hello=worker_pb2.WorkerHello(worker_id="fz-held-w", agents=[HELD_AGENT]))
                .SerializeToString()
            )
            welcome = await raw.read()
            assert welcome is not None and welcome.welcome.session_id
            task = f"hold {self.sentinels}"
            handle = await self.client.start_run(single(agent(HELD_AGENT), task))
            frame = await raw.read()
            assert frame is not None and len(frame.assignments) == 1, frame
            assignment = frame.assignments[0]
            assert (assignment.run_id, assignment.task, assignment.attempt) == (handle.run_id, task, 1)
            self.held_id = assignment.assignment_id

            # The calls, with call ids unique (so each answer names its call).
            asked: dict[str, tuple[int, worker_pb2.RuntimeCall]] = {}
            data = b""
            for i, c in enumerate(case.calls):
                call_id = f"k{i}" if 0 < len(c.call_id) <= CALL_ID_LIMIT else c.call_id
                encoded = self.encode(Frame(calls=(Call(call_id, c.assignment, c.op, c.arg, c.unknown_number),)))
                data += encoded
                if call_id and len(call_id) <= CALL_ID_LIMIT:
                    asked[call_id] = (i, worker_pb2.ConnectRequest.FromString(encoded).calls[0])
            wrong = worker_pb2.ConnectRequest(results=[
                worker_pb2.AssignmentResult(assignment_id=self.held_id, attempt=a) for a in case.wrong_attempts
            ]).SerializeToString()
            output = types_pb2.AgentOutput()
            output.CopyFrom(case.output)
            output.ClearField("error")
            output.answer = f"held: {task}"
            result = worker_pb2.ConnectRequest(results=[
                worker_pb2.AssignmentResult(assignment_id=self.held_id, attempt=1, output=output)
            ]).SerializeToString()
            frames = [data + wrong + result] if case.together else [data, wrong, result]
            for frame_data in frames:
                assert len(frame_data) <= MAX_MESSAGE
                assert await raw.write(frame_data), await raw.ending()

            run = await asyncio.wait_for(self.client.wait(handle.run_id), 10)
            if refused(output, self.sidecar.settings):
                # Too deep or too large: refused, and the agent's output says so.
                assert run.status == FAILED, run
                assert run.result.single.output.error.startswith(
                    "the worker's output was refused: results[0].output"
                ), run
            else:
                assert run.status == SUCCEEDED, run
                assert run.result.single.output.answer == f"held: {task}"

            # Every quick call was answered by now, and while the assignment still ran.
            self.sentinels += 1
            sentinel = f"fz-sentinel-{self.sentinels}"
            assert await raw.write(worker_pb2.ConnectRequest(
                results=[worker_pb2.AssignmentResult(assignment_id=sentinel, attempt=1)]).SerializeToString())
            answered: dict[str, worker_pb2.CallResult] = {}
            seen_sentinel = False
            while not seen_sentinel:
                reply = await raw.read()
                assert reply is not None
                self.check(reply, asked, answered)
                seen_sentinel = any(e.message == f"unknown assignment '{sentinel}'" for e in reply.errors)
            for call_id, (i, call) in asked.items():
                op = call.WhichOneof("op")
                if op in QUICK_OPS or op is None or call.assignment_id != self.held_id:
                    assert call_id in answered, (i, call)
                if call_id in answered and call.assignment_id == self.held_id and op is not None:
                    assert not answered[call_id].error.message.startswith(f"calls[{i}].assignment_id"), (
                        call, answered[call_id]
                    )
            await raw.call.done_writing()
            while (reply := await raw.read()) is not None:
                self.check(reply, asked, answered)
        finally:
            raw.call.cancel()
        while [s for s in self.sidecar.dispatcher.sessions.values() if s.worker_id == "fz-held-w"]:
            await asyncio.sleep(0.01)


async def test_fuzzed_runtime_calls_of_a_held_assignment(
    client: Client, workers: Workers, sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    unrelated = Unrelated(client, workers)
    steady = await unrelated.start()
    fuzz = HeldFuzz(sidecar, client, unrelated)
    await drive(HELD_CASES, fuzz.example_held, 40, *HELD_EXAMPLES)
    await unrelated.finish(steady.run_id)
    await assert_serving(client.channel)
    assert_no_errors_logged(caplog)


# == 2. run requests ================================================================================

PATTERNS = tuple(f.name for f in runs_pb2.StartRunRequest.DESCRIPTOR.oneofs_by_name["pattern"].fields)
PATTERN_NUMBERS = frozenset(f.number for f in runs_pb2.StartRunRequest.DESCRIPTOR.fields)
STEADY_RUN, STEADY_THREAD, FINISHED_RUN, LAST_RUN, LAST_THREAD = (
    "<steady-run>", "<steady-thread>", "<finished-run>", "<last-run>", "<last-thread>"
)
SHARED_BUDGET = "fz-shared"
RUN_IDS = weighted(
    (3, st.sampled_from([STEADY_RUN, FINISHED_RUN, LAST_RUN])),
    (2, st.sampled_from(["", "ghost", "r" * 300, "é🙂"])),
    (1, st.text(max_size=8)),
)
THREAD_IDS = weighted(
    (3, st.sampled_from([STEADY_THREAD, LAST_THREAD])),
    (2, st.sampled_from(["", "ghost-thread", "t" * 300])),
    (1, st.text(max_size=8)),
)
# Which run a Cancel, SubmitDecisions or GetRun names: by run id, by thread, both, neither.
LOCATORS = weighted(
    (3, st.tuples(RUN_IDS, st.just(""))),
    (2, st.tuples(st.just(""), THREAD_IDS)),
    (1, st.tuples(RUN_IDS, THREAD_IDS)),
)
AGENT_IDS = weighted((3, st.sampled_from(["", "alice"])), (1, TEXT)).filter(lambda a: a != OWNER)
ON_BUSY = weighted((6, st.sampled_from(list(runs_pb2.OnBusy.values()))), (1, st.integers(-2, 40)))
DECISIONS = st.lists(messages(types_pb2.ToolCallDecision), max_size=3)
# Unknown fields, among them pattern oneof cases this proto does not have.
REQUEST_EXTRAS = weighted(
    (4, st.just(b"")),
    (1, st.builds(field, st.integers(22, 29), st.binary(max_size=8))),
    (1, st.builds(unknown_field, st.integers(40, 2**29 - 1), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=8))),
)


@st.composite
def start_requests(draw: st.DrawFn) -> runs_pb2.StartRunRequest:
    """A StartRunRequest: usually one pattern with random contents, random
    everything else; ids may be tokens for the runs and threads the test made."""
    request = runs_pb2.StartRunRequest(
        thread_id=draw(weighted((2, st.just("")), (1, THREAD_IDS))),
        agent_id=draw(AGENT_IDS),
        run_id=draw(weighted((4, st.just("")), (1, RUN_IDS))),
        on_busy=runs_pb2.OnBusy.ValueType(draw(ON_BUSY)),
        budget_id=draw(weighted((4, st.just("")), (1, st.sampled_from([SHARED_BUDGET, "ghost", "b" * 300])))),
        state_scope=draw(weighted((4, st.just("")), (1, TEXT))),
        labels=draw(weighted((3, st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
                             (1, st.dictionaries(TEXT, TEXT, max_size=2)))),
        initial_decisions=draw(weighted((4, st.just([])), (1, DECISIONS))),
        timeout_ms=draw(weighted((3, st.just(0)), (1, UINT32))),
    )
    if draw(st.booleans()):
        request.budget.CopyFrom(cast(types_pb2.BudgetLimits, draw(messages(types_pb2.BudgetLimits))))
    pattern = draw(weighted((12, st.sampled_from(PATTERNS)), (1, st.none())))
    if pattern is not None:
        target = getattr(request, pattern)
        target.SetInParent()
        target.MergeFrom(draw(messages(message_class(target.DESCRIPTOR))))
    return request


@dataclass(frozen=True)
class Start:
    request: runs_pb2.StartRunRequest
    extra: bytes = b""  # hand-encoded fields appended on the wire


@dataclass(frozen=True)
class Cancel:
    request: runs_pb2.CancelRunRequest


@dataclass(frozen=True)
class Decide:
    request: runs_pb2.SubmitDecisionsRequest


@dataclass(frozen=True)
class Get:
    request: runs_pb2.GetRunRequest


@dataclass(frozen=True)
class Lister:
    request: runs_pb2.ListRunsRequest


@dataclass(frozen=True)
class Watch:
    request: runs_pb2.WatchRunRequest


@dataclass(frozen=True)
class Read:
    request: events_pb2.ReadEventsRequest


@dataclass(frozen=True)
class Budget:
    request: budget_pb2.CreateBudgetRequest


@dataclass(frozen=True)
class Register:
    request: registry_pb2.RegisterAgentRequest


@dataclass(frozen=True)
class Session:
    """A RunService.Session: a start, then requests (or bytes that are none)."""

    start: runs_pb2.StartRunRequest
    then: tuple[runs_pb2.SessionRequest | bytes, ...]


@dataclass(frozen=True)
class Submit:
    """A RunService.Submit stream: runs (each given a run id, or not), then
    perhaps bytes that are no SubmitRequest."""

    starts: tuple[tuple[runs_pb2.StartRunRequest, bool], ...]
    garbage: bool


Action = Start | Cancel | Decide | Get | Lister | Watch | Read | Budget | Register | Session | Submit

SESSION_FOLLOWUPS = st.lists(
    weighted(
        (2, st.builds(lambda d: runs_pb2.SessionRequest(decisions=runs_pb2.SubmitDecisionsRequest(decisions=d)),
                      DECISIONS)),
        (1, st.builds(lambda a, r: runs_pb2.SessionRequest(cancel=runs_pb2.CancelRunRequest(agent_id=a, reason=r)),
                      AGENT_IDS, TEXT)),
        (1, st.builds(lambda r: runs_pb2.SessionRequest(start=r), start_requests())),
        (1, st.just(runs_pb2.SessionRequest())),
        (1, st.sampled_from([b"\xff\xff", MALFORMED["bad_utf8"], MALFORMED["truncated"]])),
    ),
    max_size=3,
).map(tuple)
ACTIONS: st.SearchStrategy[Action] = weighted(
    (8, st.builds(Start, start_requests(), REQUEST_EXTRAS)),
    (2, st.builds(lambda at, a, why, w: Cancel(runs_pb2.CancelRunRequest(
        run_id=at[0], thread_id=at[1], agent_id=a, reason=why, wait=w)), LOCATORS, AGENT_IDS, TEXT, st.booleans())),
    (2, st.builds(lambda at, a, d: Decide(runs_pb2.SubmitDecisionsRequest(
        run_id=at[0], thread_id=at[1], agent_id=a, decisions=d)), LOCATORS, AGENT_IDS, DECISIONS)),
    (1, st.builds(lambda at: Get(runs_pb2.GetRunRequest(run_id=at[0], thread_id=at[1])), LOCATORS)),
    (1, st.builds(lambda t, s, a, n, p, i: Lister(runs_pb2.ListRunsRequest(
        thread_id=t, status=s, agent_id=a, page_size=n, page_token=p, include_results=i)),
        THREAD_IDS, st.integers(-1, 40), AGENT_IDS, UINT32,
        st.one_of(st.sampled_from(["", "1", "²", "٣", "9" * 30, "9" * 5000, "-1", "0x10"]), st.text(max_size=4)),
        st.booleans())),
    (1, st.builds(lambda r, s: Watch(runs_pb2.WatchRunRequest(run_id=r, after_seq=s)), RUN_IDS, UINT64)),
    (1, st.builds(lambda r, s, k, f: Read(events_pb2.ReadEventsRequest(run_id=r, after_seq=s, kinds=k, follow=f)),
                  RUN_IDS, UINT64, st.lists(st.sampled_from(["agent_finished", "run_finished", "", "nope"]),
                                            max_size=2), st.booleans())),
    (1, st.builds(Budget, messages(budget_pb2.CreateBudgetRequest))),
    (1, st.builds(Register, messages(registry_pb2.RegisterAgentRequest))),
    (2, st.builds(Session, start_requests(), SESSION_FOLLOWUPS)),
    (2, st.builds(
        Submit, st.lists(st.tuples(start_requests(), weighted((4, st.just(True)), (1, st.just(False)))), max_size=3)
        .map(tuple), weighted((4, st.just(False)), (1, st.just(True))),
    )),
)


def _start(**fields: Any) -> Start:
    return Start(runs_pb2.StartRunRequest(**fields))


def _spec(name: str, **metadata: Any) -> patterns_pb2.AgentRef:
    spec = types_pb2.AgentSpec(name=name)
    for key, value in metadata.items():
        spec.metadata[key] = value
    return patterns_pb2.AgentRef(spec=spec)


SOME = single(agent("fz-nobody"), "t")
REQUEST_EXAMPLES: list[list[Action]] = [
    [_start()],  # no pattern
    [Start(runs_pb2.StartRunRequest(), field(23, b"\x0a\x01x"))],  # a pattern this proto does not have
    [_start(single=single(agent(""), "t"))],
    [_start(single=single(agent("n" * 257), "t"))],
    [_start(single=single(agent("x"), "h" * (MAX_FIELD + 1)))],
    [_start(single=single(agent("x"), "H" * (MAX_MESSAGE + 1)))],  # over max_message_bytes
    [_start(single=patterns_pb2.SingleRun(agent=patterns_pb2.AgentRef(registered_name="ghost"), task="t"))],
    [_start(single=patterns_pb2.SingleRun(agent=_spec("x", timeout_secs=float("inf")), task="t"))],
    [_start(single=patterns_pb2.SingleRun(agent=_spec("x", timeout_secs=1e300), task="t"))],
    [_start(single=patterns_pb2.SingleRun(agent=_spec("x", timeout_secs=float("nan")), task="t"))],
    [_start(single=patterns_pb2.SingleRun(agent=_spec("x", deep=_deep(30)), task="t"))],
    [_start(fleet=patterns_pb2.FleetRun(agents=[agent("x")], agent_timeout_secs=1e300))],
    [_start(single=SOME, budget=types_pb2.BudgetLimits(max_cost_usd=1e300))],
    [_start(single=SOME, budget=types_pb2.BudgetLimits(max_total_tokens=2**64 - 1))],
    [_start(single=SOME, budget=types_pb2.BudgetLimits(max_input_tokens=2**63, max_agents=2**32 - 1))],
    [_start(single=SOME, budget=types_pb2.BudgetLimits(max_cost_usd=float("nan")))],
    [_start(single=SOME, on_busy=runs_pb2.OnBusy.ValueType(7))],  # an on_busy value the proto does not have
    [_start(single=SOME, thread_id=STEADY_THREAD)],  # busy thread
    [_start(single=SOME, thread_id=STEADY_THREAD, on_busy=runs_pb2.ON_BUSY_ENQUEUE)],
    [_start(single=SOME, run_id=STEADY_RUN)],
    [_start(single=SOME, budget_id="ghost")],
    [_start(single=SOME, labels={"k": "v" * (MAX_FIELD + 1)})],
    [_start(single=SOME, initial_decisions=[types_pb2.ToolCallDecision()])],
    [_start(swarm=patterns_pb2.SwarmRun(agents=[agent("a")], mode=patterns_pb2.SwarmMode.ValueType(99), task="t"))],
    [_start(map_reduce=patterns_pb2.MapReduceRun(mapper=agent("m"), reducer=agent("m"), items=["x"] * 3))],
    [_start(single=SOME, timeout_ms=1)],
    [Budget(budget_pb2.CreateBudgetRequest(limits=types_pb2.BudgetLimits(max_cost_usd=1e300)))],
    [Register(registry_pb2.RegisterAgentRequest(agent=_spec("fz-inf", timeout_secs=float("inf")).spec))],
    [Cancel(runs_pb2.CancelRunRequest(run_id=STEADY_RUN))],  # not the owner
    [Cancel(runs_pb2.CancelRunRequest(thread_id=STEADY_THREAD, agent_id="mallory", wait=True))],
    [Cancel(runs_pb2.CancelRunRequest(run_id="ghost", thread_id=STEADY_THREAD))],
    [Cancel(runs_pb2.CancelRunRequest())],
    [Decide(runs_pb2.SubmitDecisionsRequest(run_id=STEADY_RUN))],
    [Decide(runs_pb2.SubmitDecisionsRequest(run_id=FINISHED_RUN, decisions=[types_pb2.ToolCallDecision(
        target_id="t", action=types_pb2.DECISION_ACTION_RESUME)]))],
    [Decide(runs_pb2.SubmitDecisionsRequest(run_id="ghost"))],
    [Get(runs_pb2.GetRunRequest())],
    [Get(runs_pb2.GetRunRequest(thread_id="ghost-thread"))],
    [Lister(runs_pb2.ListRunsRequest(page_token="²"))],
    [Lister(runs_pb2.ListRunsRequest(page_token="9" * 5000))],
    [Lister(runs_pb2.ListRunsRequest(page_size=2**32 - 1))],
    [Watch(runs_pb2.WatchRunRequest(run_id="ghost"))],
    [Watch(runs_pb2.WatchRunRequest(run_id=FINISHED_RUN, after_seq=2**64 - 1))],
    [Watch(runs_pb2.WatchRunRequest(run_id=STEADY_RUN))],
    [Read(events_pb2.ReadEventsRequest(run_id=FINISHED_RUN, kinds=["nope"]))],
    [Submit(
        (
            (runs_pb2.StartRunRequest(single=SOME), True),
            (runs_pb2.StartRunRequest(), True),  # no pattern
            (runs_pb2.StartRunRequest(single=SOME), False),  # no run id
            (runs_pb2.StartRunRequest(single=SOME, run_id=STEADY_RUN), False),  # a taken run id
        ),
        True,  # then bytes that are no SubmitRequest
    )],
    [Submit(((runs_pb2.StartRunRequest(single=single(agent("x"), "H" * (MAX_MESSAGE + 1))), True),), False)],
    [Session(runs_pb2.StartRunRequest(), ())],
    [Session(runs_pb2.StartRunRequest(single=SOME), (runs_pb2.SessionRequest(), b"\xff\xff"))],
    [Session(runs_pb2.StartRunRequest(single=SOME), (runs_pb2.SessionRequest(start=runs_pb2.StartRunRequest()),))],
]


def _terminal(status: int) -> bool:
    return status in (types_pb2.RUN_STATUS_SUCCEEDED, types_pb2.RUN_STATUS_FAILED, types_pb2.RUN_STATUS_CANCELLED)


class RequestFuzz:
    def __init__(self, client: Client, unrelated: Unrelated, steady: runs_pb2.Run, finished: runs_pb2.Run) -> None:
        self.client = client
        self.unrelated = unrelated
        self.steady = steady
        self.finished = finished
        self.last_run = "fz-no-run-yet"
        self.last_thread = "fz-no-thread-yet"
        channel = client.channel
        self.events = events_pb2_grpc.EventServiceStub(channel)
        self.budgets = budget_pb2_grpc.BudgetServiceStub(channel)
        self.start_bytes = channel.unary_unary(
            "/car.v1.RunService/StartRun",
            request_serializer=None,
            response_deserializer=runs_pb2.StartRunResponse.FromString,
        )
        self.submit_bytes = channel.stream_stream(
            "/car.v1.RunService/Submit",
            request_serializer=None,
            response_deserializer=runs_pb2.SubmitResponse.FromString,
        )
        self.submits = 0
        self.session_bytes = channel.stream_stream(
            "/car.v1.RunService/Session",
            request_serializer=None,
            response_deserializer=runs_pb2.SessionResponse.FromString,
        )

    def run_id(self, token: str) -> str:
        return {STEADY_RUN: self.steady.run_id, FINISHED_RUN: self.finished.run_id, LAST_RUN: self.last_run}.get(
            token, token
        )

    def thread_id(self, token: str) -> str:
        return {STEADY_THREAD: self.steady.thread_id, LAST_THREAD: self.last_thread}.get(token, token)

    def start_request(self, template: runs_pb2.StartRunRequest) -> runs_pb2.StartRunRequest:
        request = runs_pb2.StartRunRequest()
        request.CopyFrom(template)
        request.thread_id = self.thread_id(request.thread_id)
        request.run_id = self.run_id(request.run_id)
        if request.thread_id == self.steady.thread_id and request.on_busy == runs_pb2.ON_BUSY_INTERRUPT:
            request.on_busy = runs_pb2.ON_BUSY_REJECT  # an interrupt would end the long run: it is not bad input
        return request

    def locate(self, template: Any) -> Any:
        request = type(template)()
        request.CopyFrom(template)
        request.run_id = self.run_id(request.run_id)
        if hasattr(request, "thread_id"):
            request.thread_id = self.thread_id(request.thread_id)
        return request

    async def answer(self, what: str, call: Awaitable[T], size: int = 0) -> T | None:
        """The call's answer, or None when it was refused clearly."""
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            assert_clear(err, what, oversize=size > MAX_MESSAGE)
            return None

    async def started(self, handle: types_pb2.RunHandle, owner: str) -> None:
        """A fuzzed run was started: nobody serves its agents, so cancel it."""
        assert handle.run_id and handle.thread_id and handle.agent_id == owner, handle
        self.last_run, self.last_thread = handle.run_id, handle.thread_id
        await self.client.runs.CancelRun(runs_pb2.CancelRunRequest(run_id=handle.run_id, agent_id=owner, wait=True))
        run = await self.client.get_run(handle.run_id)
        assert _terminal(run.status), run
        assert "internal error" not in str(run), run

    def touches_steady(self, request: Any) -> bool:
        return bool(request.run_id == self.steady.run_id or request.thread_id == self.steady.thread_id)

    async def act(self, action: Action) -> None:
        runs = self.client.runs
        if isinstance(action, Start):
            request = self.start_request(action.request)
            data = request.SerializeToString() + action.extra
            assert runs_pb2.StartRunRequest.FromString(data).run_id == request.run_id
            reply = await self.answer("StartRun", self.start_bytes(data), len(data))
            if reply is not None:
                await self.started(reply.run, request.agent_id)
        elif isinstance(action, Cancel):
            request = self.locate(action.request)
            if await self.answer("CancelRun", runs.CancelRun(request)) is not None:
                assert not self.touches_steady(request), request  # only its owner may cancel it
        elif isinstance(action, Decide):
            request = self.locate(action.request)
            if await self.answer("SubmitDecisions", runs.SubmitDecisions(request)) is not None:
                assert not self.touches_steady(request), request
        elif isinstance(action, Get):
            await self.answer("GetRun", runs.GetRun(self.locate(action.request)))
        elif isinstance(action, Lister):
            listing = runs_pb2.ListRunsRequest()
            listing.CopyFrom(action.request)
            listing.thread_id = self.thread_id(listing.thread_id)
            await self.answer("ListRuns", runs.ListRuns(listing))
        elif isinstance(action, Watch | Read):
            request = self.locate(action.request)
            call = runs.WatchRun(request) if isinstance(action, Watch) else self.events.ReadEvents(request)
            try:
                async with asyncio.timeout(0.3):  # a live run's watch waits for its next event
                    async for _ in call:
                        pass
            except TimeoutError:
                pass
            except grpc.aio.AioRpcError as err:
                assert_clear(err, type(action).__name__)
            finally:
                call.cancel()
        elif isinstance(action, Budget):
            await self.answer("CreateBudget", self.budgets.CreateBudget(action.request))
        elif isinstance(action, Register):
            await self.answer("RegisterAgent", self.client.registry.RegisterAgent(action.request))
        elif isinstance(action, Session):
            await self.session(action)
        else:
            await self.submit(action)

    async def submit(self, action: Submit) -> None:
        starts = []
        for template, give_id in action.starts:
            request = self.start_request(template)
            if give_id and not request.run_id:
                self.submits += 1
                request.run_id = f"fz-submit-{self.submits}"
            starts.append(request)
        data = runs_pb2.SubmitRequest(starts=starts).SerializeToString()
        call = self.submit_bytes()
        try:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(data)
                if action.garbage:
                    await call.write(b"\xff\xff")
                await call.done_writing()
            answers: list[runs_pb2.SubmitAnswer] = []
            ended = Ends(OK, "")
            async with asyncio.timeout(10):
                while True:
                    # Nobody serves the fuzzed runs' agents: cancel whatever has started.
                    for request in starts:
                        if request.run_id not in {a.run_id for a in answers}:
                            with contextlib.suppress(grpc.aio.AioRpcError):
                                await self.client.runs.CancelRun(
                                    runs_pb2.CancelRunRequest(run_id=request.run_id, agent_id=request.agent_id)
                                )
                    try:
                        reply = await asyncio.wait_for(call.read(), 0.05)
                    except TimeoutError:
                        continue
                    except grpc.aio.AioRpcError as err:
                        ended = Ends(err.code(), err.details() or "")
                        break
                    if reply is grpc.aio.EOF:
                        break
                    answers.extend(reply.answers)
            if len(data) > MAX_MESSAGE:
                assert ended.code == EXHAUSTED and "larger than max" in ended.details and not answers, ended
                return
            if action.garbage:
                assert ended.code == INVALID and ended.details.startswith("request: is not a valid"), ended
            else:
                assert ended == Ends(OK, ""), ended
            assert sorted(a.run_id for a in answers) == sorted(r.run_id for r in starts), (answers, starts)
            for answer in answers:
                if answer.WhichOneof("reply") == "error":
                    error = answer.error
                    assert code_of(error.code) in CLEAR and error.message and error.field, answer
                else:
                    assert _terminal(answer.finished.status), answer
                    assert "internal error" not in str(answer), answer
        finally:
            call.cancel()

    async def session(self, action: Session) -> None:
        start = self.start_request(action.start)
        data = runs_pb2.SessionRequest(start=start).SerializeToString()
        call = self.session_bytes()
        try:
            await call.write(data)
            first = await self.answer("Session", asyncio.wait_for(call.read(), 10), len(data))
            if first is None:
                return
            assert first.WhichOneof("reply") == "started", first
            handle = first.started
            self.last_run, self.last_thread = handle.run_id, handle.thread_id
            sent_garbage = False
            for item in action.then:
                try:
                    await call.write(item if isinstance(item, bytes) else item.SerializeToString())
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    break  # the run, and with it the stream, has ended
                if isinstance(item, bytes):
                    sent_garbage = True
                    break
            else:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(
                        runs_pb2.SessionRequest(cancel=runs_pb2.CancelRunRequest(agent_id=start.agent_id))
                        .SerializeToString()
                    )
                    await call.done_writing()
            ended = Ends(OK, "")
            try:
                async with asyncio.timeout(10):
                    while (reply := await call.read()) is not grpc.aio.EOF:
                        if reply.WhichOneof("reply") == "error":
                            error = reply.error
                            assert code_of(error.code) in CLEAR and error.message and error.field, error
            except grpc.aio.AioRpcError as err:
                ended = Ends(err.code(), err.details() or "")
            if sent_garbage:  # unless the run had already ended
                assert ended == Ends(OK, "") or (
                    ended.code == INVALID and ended.details.startswith(BAD_REQUEST)
                ), ended
            else:
                assert ended == Ends(OK, ""), ended
            await self.client.runs.CancelRun(
                runs_pb2.CancelRunRequest(run_id=handle.run_id, agent_id=start.agent_id, wait=True)
            )
        finally:
            call.cancel()

    async def example(self, actions: list[Action]) -> None:
        async def play() -> None:
            for action in actions:
                await self.act(action)

        async with asyncio.timeout(30):
            await asyncio.gather(play(), self.unrelated.ping())
            await assert_serving(self.client.channel)


async def test_fuzzed_run_requests(
    client: Client, workers: Workers, sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    unrelated = Unrelated(client, workers)
    steady = await unrelated.start()
    finished = await client.run(single(agent(ECHO), "before the fuzz"))
    await client.register_agent(types_pb2.AgentSpec(name=REGISTERED))
    await budget_pb2_grpc.BudgetServiceStub(client.channel).CreateBudget(
        budget_pb2.CreateBudgetRequest(budget_id=SHARED_BUDGET)
    )
    fuzz = RequestFuzz(client, unrelated, steady, finished)
    await drive(st.lists(ACTIONS, min_size=1, max_size=3), fuzz.example, 100, *REQUEST_EXAMPLES)
    # Every fuzzed run has ended; the long one is still going, and then ends well.
    assert [r.run_id for r in sidecar.runs.runs.values() if not r.finished] == [steady.run_id]
    await unrelated.finish(steady.run_id)
    await assert_serving(client.channel)
    assert_no_errors_logged(caplog)


# == 3. the cases a random search should not have to find ===================================


async def test_a_session_message_that_is_no_session_request_ends_the_stream(client: Client) -> None:
    session = client.channel.stream_stream(
        "/car.v1.RunService/Session", request_serializer=None, response_deserializer=runs_pb2.SessionResponse.FromString
    )
    first = session()
    await first.write(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await first.read()
    assert err.value.code() == INVALID and (err.value.details() or "").startswith(BAD_REQUEST)

    later = session()
    await later.write(runs_pb2.SessionRequest(start=runs_pb2.StartRunRequest(single=SOME)).SerializeToString())
    started = (await later.read()).started
    await later.write(MALFORMED["bad_utf8"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:
            await later.read()  # its events, then the status
    assert err.value.code() == INVALID and (err.value.details() or "").startswith(BAD_REQUEST)
    # The run does not depend on the stream that started it.
    assert (await client.get_run(started.run_id)).status == types_pb2.RUN_STATUS_RUNNING
    await client.cancel(started.run_id, wait=True)


def _deep_start_run(depth: int) -> bytes:
    """A StartRunRequest whose single.agent.spec.metadata holds a value `depth` lists deep."""
    entry = field(1, b"k") + field(2, nested_value(depth))
    spec = field(1, b"x") + field(5, field(1, entry))
    return field(10, field(1, field(1, spec)) + field(2, b"t"))


async def test_an_undecodable_unary_request_is_invalid_argument(client: Client) -> None:
    start_run = client.channel.unary_unary(
        "/car.v1.RunService/StartRun",
        request_serializer=None,
        response_deserializer=runs_pb2.StartRunResponse.FromString,
    )
    assert runs_pb2.StartRunRequest.FromString(_deep_start_run(20)).single.agent.spec.name == "x"
    for data in (b"\xff\xff\xff", MALFORMED["truncated"], MALFORMED["bad_length"], _deep_start_run(120)):
        with pytest.raises(DecodeError):
            runs_pb2.StartRunRequest.FromString(data)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await start_run(data)
        assert err.value.code() == INVALID, (data[:20], err.value.code(), err.value.details())
