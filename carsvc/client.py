"""Start, watch, inspect and cancel runs from Python.

    from carsvc.client import Client, agent, map_reduce

    async with Client("127.0.0.1:50051") as client:
        run = await client.run(
            map_reduce(agent("summarizer"), agent("combiner"), "Summarize", ["a", "b"])
        )
        print(run.result.map_reduce.reduced_answer)

The pattern builders (`agent`, `registered`, and one per pattern: `single`,
`swarm`, `pipeline`, `supervisor`, `delegator`, `spawn_subtask`, `map_reduce`,
`vote`, `fleet`, `adversarial_review`, `tournament`, `advisor`) return the
generated protobuf messages, so anything the contract offers can also be set on
them directly. docs/patterns/ describes each pattern.

Given several sidecar addresses (replicas sharing one store), a client sends
its calls to the first that answers; when a call fails with UNAVAILABLE it moves
to the next, and retries there the calls that are safe to repeat (reads, and
watches, which resume after the last event delivered).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from carsvc._proto.car.v1 import (
    events_pb2,
    patterns_pb2,
    registry_pb2,
    registry_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    types_pb2,
)
from carsvc.security.channel import DEFAULT_MAX_MESSAGE_BYTES, TLS, addresses, open_channel
from carsvc.values import from_value, to_value

__all__ = [
    "Client",
    "RunRefused",
    "RunSession",
    "RunStream",
    "adversarial_review",
    "advisor",
    "agent",
    "delegator",
    "deny",
    "fleet",
    "map_reduce",
    "pipeline",
    "registered",
    "resume",
    "single",
    "spawn_subtask",
    "supervisor",
    "swarm",
    "tournament",
    "vote",
]

RunEvent = Any  # carsvc._proto.car.v1.events_pb2.RunEvent
T = TypeVar("T")

# StartRunRequest's pattern oneof: message type -> field name.
_PATTERN_FIELDS = {
    f.message_type.full_name: f.name
    for f in runs_pb2.StartRunRequest.DESCRIPTOR.oneofs_by_name["pattern"].fields
    if f.message_type is not None
}
_ON_BUSY = {
    "reject": runs_pb2.ON_BUSY_REJECT,
    "interrupt": runs_pb2.ON_BUSY_INTERRUPT,
    "enqueue": runs_pb2.ON_BUSY_ENQUEUE,
}


def _strings(what: str, values: Iterable[str]) -> list[str]:
    """`values` as a list; a lone string is refused (it would be its characters)."""
    if isinstance(values, str | bytes):
        raise TypeError(f"{what} must be a list of strings, not a {type(values).__name__} ({values!r} would be "
                        f"its characters, one item each); pass [{values!r}] for one")
    return list(values)


def agent(
    name: str,
    system_prompt: str = "",
    *,
    tools: Iterable[str] = (),
    max_turns: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> patterns_pb2.AgentRef:
    """An inline agent spec."""
    spec = types_pb2.AgentSpec(
        name=name, system_prompt=system_prompt, tools=_strings("tools", tools), max_turns=max_turns
    )
    if metadata:
        spec.metadata.CopyFrom(to_value(dict(metadata)).struct_value)
    return patterns_pb2.AgentRef(spec=spec)


def registered(name: str) -> patterns_pb2.AgentRef:
    """An agent registered with RegistryService, by name."""
    return patterns_pb2.AgentRef(registered_name=name)


def single(agent_ref: patterns_pb2.AgentRef, task: str) -> patterns_pb2.SingleRun:
    return patterns_pb2.SingleRun(agent=agent_ref, task=task)


def map_reduce(
    mapper: patterns_pb2.AgentRef,
    reducer: patterns_pb2.AgentRef,
    task: str,
    items: Iterable[str],
    *,
    max_concurrent: int | None = None,
) -> patterns_pb2.MapReduceRun:
    msg = patterns_pb2.MapReduceRun(mapper=mapper, reducer=reducer, task=task, items=_strings("items", items))
    if max_concurrent is not None:
        msg.max_concurrent = max_concurrent
    return msg


def resume(target_id: str, result: Any = None, *, decision_id: str = "") -> types_pb2.ToolCallDecision:
    """Approve a suspended tool call; `result` is handed to the waiting agent."""
    decision = types_pb2.ToolCallDecision(
        target_id=target_id, decision_id=decision_id, action=types_pb2.DECISION_ACTION_RESUME
    )
    if result is not None:
        decision.result.CopyFrom(to_value(result))
    return decision


def deny(target_id: str, reason: str = "", *, decision_id: str = "") -> types_pb2.ToolCallDecision:
    """Refuse a suspended tool call."""
    return types_pb2.ToolCallDecision(
        target_id=target_id, decision_id=decision_id, action=types_pb2.DECISION_ACTION_CANCEL, reason=reason
    )


class RunSession:
    """One run on one RunService.Session stream: its events, decisions and cancel.

    Use it as an async context manager (or call close()) to end the stream early;
    a session whose run has finished ends by itself."""

    def __init__(self, call: Any, target: str = "") -> None:
        self._call = call
        self.target = target  # the sidecar address the stream runs on
        self.handle: types_pb2.RunHandle = types_pb2.RunHandle()
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._error: grpc.aio.AioRpcError | None = None

    async def _open(self, start: runs_pb2.StartRunRequest) -> None:
        await self._call.write(runs_pb2.SessionRequest(start=start))
        first = await self._call.read()
        if first is grpc.aio.EOF:
            await self._call  # raises the stream's status
            raise ConnectionError("the session stream ended before the run started")
        self.handle = first.started
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                kind = reply.WhichOneof("reply")
                if kind == "events":
                    for event in reply.events.events:
                        self._events.put_nowait(event)
                else:
                    self._replies.put_nowait(reply)
        except grpc.aio.AioRpcError as err:
            self._error = err
        finally:
            self._events.put_nowait(None)
            self._replies.put_nowait(None)  # wakes a request the stream ended on

    async def events(self) -> AsyncIterator[RunEvent]:
        """The run's events, ending with run_finished. Raises the stream's
        error (grpc.aio.AioRpcError) if it broke off before."""
        while (event := await self._events.get()) is not None:
            yield event
        if self._error is not None and self._error.code() != grpc.StatusCode.CANCELLED:
            raise self._error

    async def _request(self, message: runs_pb2.SessionRequest) -> Any:
        await self._call.write(message)
        reply = await self._replies.get()
        if reply is None:
            self._replies.put_nowait(None)
            raise ConnectionError("the session stream ended before the sidecar answered")
        if reply.WhichOneof("reply") == "error":
            raise ValueError(f"{reply.error.field}: {reply.error.message}")
        return getattr(reply, reply.WhichOneof("reply"))

    async def decide(self, *decisions: types_pb2.ToolCallDecision) -> runs_pb2.SubmitDecisionsResponse:
        response: runs_pb2.SubmitDecisionsResponse = await self._request(
            runs_pb2.SessionRequest(decisions=runs_pb2.SubmitDecisionsRequest(decisions=decisions))
        )
        return response

    async def cancel(self, reason: str = "", *, wait: bool = False) -> runs_pb2.CancelRunResponse:
        response: runs_pb2.CancelRunResponse = await self._request(
            runs_pb2.SessionRequest(cancel=runs_pb2.CancelRunRequest(reason=reason, wait=wait))
        )
        return response

    async def close(self) -> None:
        """Ends the stream (the run itself goes on; cancel() stops it)."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._call.cancel()

    async def __aenter__(self) -> RunSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}
# Trailing metadata of a watch the sidecar ended because the watcher fell behind.
RESUME_SEQ_KEY = "carsvc-resume-after-seq"


def _resume_seq(err: grpc.aio.AioRpcError) -> int | None:
    """The seq to resume from that a watch ended for falling behind names, if any."""
    for key, value in err.trailing_metadata() or ():
        if key == RESUME_SEQ_KEY:
            return int(value)
    return None


class RunRefused(Exception):
    """A run on a RunStream did not start: the status StartRun would have
    answered, and the offending field."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.message = message
        self.field = field


class RunStream:
    """Many runs over one RunService.Submit stream: no stream per run, and runs
    started while a write is under way travel together, so it suits short runs
    started at a high rate. `run()` may be called from many tasks at once; each
    returns its run's run_finished event.

        async with client.run_stream() as stream:
            finished = await stream.run(single(agent("echo"), "hi"))
            print(finished.result.single.output.answer)
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._target = client.target
        self._call: Any = None  # the Submit call, opened by the writer on an address that answers
        self._opened = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[events_pb2.RunFinished]] = {}
        self._outbox: list[runs_pb2.StartRunRequest] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._ended: BaseException | None = None
        self._filling: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    async def run(self, pattern: Message, **options: Any) -> events_pb2.RunFinished:
        """Starts a run (same options as Client.start_run) and returns its
        run_finished event once it has ended. Raises RunRefused if it could not
        start, and the stream's error if the stream broke."""
        request = self._client._start_request(pattern, **options)
        if not request.run_id:
            request.run_id = uuid.uuid4().hex
        if self._ended is not None:
            raise self._ended
        if self._closing:
            raise RuntimeError("the run stream is closing")
        if request.run_id in self._waiting:
            raise ValueError(f"run_id {request.run_id!r} is already waiting on this stream")
        future: asyncio.Future[events_pb2.RunFinished] = asyncio.get_running_loop().create_future()
        self._waiting[request.run_id] = future
        self._outbox.append(request)
        self._wakeup.set()
        try:
            return await future
        finally:
            self._waiting.pop(request.run_id, None)

    async def _write(self) -> None:
        await self._client._connect()
        self._target = self._client.target
        self._call = self._client.runs.Submit()
        self._opened.set()
        try:
            while True:
                if not self._outbox:
                    if self._closing:
                        await self._call.done_writing()
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                starts, self._outbox = self._outbox, []
                await self._call.write(runs_pb2.SubmitRequest(starts=starts))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the reader reports why the stream ended

    async def _read(self) -> None:
        await self._opened.wait()
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                for answer in response.answers:
                    future = self._waiting.get(answer.run_id)
                    if future is None or future.done():
                        continue
                    if answer.HasField("finished") and answer.finished.result_omitted:
                        self._complete_later(future, answer.run_id, answer.finished)
                    elif answer.HasField("finished"):
                        future.set_result(answer.finished)
                    else:
                        code = _STATUS_CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN)
                        future.set_exception(RunRefused(code, answer.error.message, answer.error.field))
            if self._filling:  # results still being read: those runs are answered
                await asyncio.wait(set(self._filling))
            self._ended = ConnectionError("the Submit stream has ended")
        except grpc.aio.AioRpcError as err:
            self._ended = err
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self._client._move_on(self._target)  # the next stream goes to the next address
        finally:
            ended = self._ended or ConnectionError("the Submit stream has ended")
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ended)

    def _complete_later(
        self, future: asyncio.Future[events_pb2.RunFinished], run_id: str, finished: events_pb2.RunFinished
    ) -> None:
        """Fills in a result too large to travel in the answer, then answers."""

        async def fill() -> None:
            try:
                finished.result.CopyFrom(await self._client.read_result(run_id))
            except grpc.aio.AioRpcError as err:
                if not future.done():
                    future.set_exception(err)
                return
            if not future.done():
                future.set_result(finished)

        task = asyncio.get_running_loop().create_task(fill())
        self._filling.add(task)
        task.add_done_callback(self._filling.discard)

    async def close(self) -> None:
        """Half-closes the stream and waits until every run started on it has
        answered."""
        self._closing = True
        self._wakeup.set()
        await asyncio.gather(self._writer, self._reader)

    async def __aenter__(self) -> RunStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            if self._call is not None:
                self._call.cancel()
            self._writer.cancel()
            self._reader.cancel()


_SWARM_MODES = {
    "parallel": patterns_pb2.SWARM_MODE_PARALLEL,
    "sequential": patterns_pb2.SWARM_MODE_SEQUENTIAL,
    "debate": patterns_pb2.SWARM_MODE_DEBATE,
}


def swarm(
    agents: Iterable[patterns_pb2.AgentRef],
    task: str,
    *,
    mode: str = "parallel",
    synthesizer: patterns_pb2.AgentRef | None = None,
    isolated: bool = False,
) -> patterns_pb2.SwarmRun:
    """`mode` is "parallel", "sequential" or "debate" (the synthesizer judges a debate)."""
    if mode not in _SWARM_MODES:
        raise ValueError(f"mode must be one of {sorted(_SWARM_MODES)}, not {mode!r}")
    msg = patterns_pb2.SwarmRun(agents=list(agents), mode=_SWARM_MODES[mode], task=task, isolated=isolated)
    if synthesizer is not None:
        msg.synthesizer.CopyFrom(synthesizer)
    return msg


def pipeline(stages: Iterable[patterns_pb2.AgentRef], task: str) -> patterns_pb2.PipelineRun:
    return patterns_pb2.PipelineRun(stages=list(stages), task=task)


def supervisor(
    workers: Iterable[patterns_pb2.AgentRef],
    supervisor_ref: patterns_pb2.AgentRef,
    task: str,
    *,
    max_rounds: int | None = None,
) -> patterns_pb2.SupervisorRun:
    msg = patterns_pb2.SupervisorRun(workers=list(workers), supervisor=supervisor_ref, task=task)
    if max_rounds is not None:
        msg.max_rounds = max_rounds
    return msg


def delegator(
    main: patterns_pb2.AgentRef, specialists: Iterable[patterns_pb2.AgentRef], task: str
) -> patterns_pb2.DelegatorRun:
    return patterns_pb2.DelegatorRun(main=main, specialists=list(specialists), task=task)


def spawn_subtask(main: patterns_pb2.AgentRef, task: str) -> patterns_pb2.SpawnSubtaskRun:
    return patterns_pb2.SpawnSubtaskRun(main=main, task=task)


def vote(
    agents: Iterable[patterns_pb2.AgentRef], task: str, *, synthesizer: patterns_pb2.AgentRef | None = None
) -> patterns_pb2.VoteRun:
    msg = patterns_pb2.VoteRun(agents=list(agents), task=task)
    if synthesizer is not None:
        msg.synthesizer.CopyFrom(synthesizer)
    return msg


def fleet(
    agents: Iterable[patterns_pb2.AgentRef], task: str = "", *, agent_timeout_secs: float | None = None
) -> patterns_pb2.FleetRun:
    """Empty `task`: each agent works on its own system prompt (its mission)."""
    msg = patterns_pb2.FleetRun(agents=list(agents), task=task)
    if agent_timeout_secs is not None:
        msg.agent_timeout_secs = agent_timeout_secs
    return msg


def adversarial_review(
    reviewer: patterns_pb2.AgentRef,
    work_output: str,
    criteria: Iterable[str],
    *,
    author: str = "",
    fail_on_blockers: bool | None = None,
) -> patterns_pb2.AdversarialReviewRun:
    msg = patterns_pb2.AdversarialReviewRun(
        reviewer=reviewer, author=author, work_output=work_output, criteria=_strings("criteria", criteria)
    )
    if fail_on_blockers is not None:
        msg.fail_on_blockers = fail_on_blockers
    return msg


def tournament(
    competitors: Iterable[patterns_pb2.AgentRef], judge: patterns_pb2.AgentRef, task: str
) -> patterns_pb2.TournamentRun:
    return patterns_pb2.TournamentRun(competitors=list(competitors), judge=judge, task=task)


def advisor(
    agent_ref: patterns_pb2.AgentRef, advisor_ref: patterns_pb2.AgentRef, task: str, *, max_uses: int
) -> patterns_pb2.AdvisorRun:
    """`agent_ref` runs `task` and may consult `advisor_ref` up to `max_uses` times."""
    return patterns_pb2.AdvisorRun(agent=agent_ref, advisor=advisor_ref, task=task, max_uses=max_uses)


# watch() retries every this many seconds at most while the sidecar is away.
WATCH_RETRY_MAX_DELAY_S = 1.0
# A run in one of these states has ended.
_ENDED = frozenset({types_pb2.RUN_STATUS_SUCCEEDED, types_pb2.RUN_STATUS_FAILED, types_pb2.RUN_STATUS_CANCELLED})


class Client:
    """An asyncio client for the run, registry and state services.

    `target`: the sidecar's "host:port", or several replicas' addresses (a
    list, or one string with commas: "h1:50051,h2:50051"). With several, calls
    go to the first address that answers; a call that fails with UNAVAILABLE
    moves the client to the next, and reads (get_run, read_result, list_runs,
    list_workers, get_state) are retried there, once around the list; watch()
    resumes there from the last event it delivered. Calls that change something
    (start_run, cancel, submit_decisions, set_state, register_agent, and the
    Session and Submit streams) raise instead: the sidecar may have acted on
    them; the next call goes to the next address.

    `token`: a client token, sent as `authorization: Bearer` metadata on every
    call. `tls`: a carsvc.security.TLS (True: TLS with the system's roots);
    plaintext by default. `max_message_bytes`: the largest message the client
    sends or accepts (16 MiB, the sidecar's default max_message_bytes).
    `options`: extra gRPC channel arguments, which win over the SDK's. These
    shape the channel the client opens, so token and tls cannot be combined
    with `channel`."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        channel: grpc.aio.Channel | None = None,
        options: list[tuple[str, Any]] | None = None,
        token: str | None = None,
        tls: TLS | bool | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if channel is not None and (token is not None or tls):
            raise ValueError("token and tls configure the channel Client opens: not usable with channel=")
        self._owns_channel = channel is None
        # A given channel has one address: the client never moves off it.
        self.targets = addresses(target)[: 1 if channel is not None else None]
        self._at = 0  # the index of the current address
        # The channel tries to reconnect at least every WATCH_RETRY_MAX_DELAY_S,
        # the pace of watch()'s own retries while the sidecar is away.
        self._open = functools.partial(
            open_channel,
            token=token,
            tls=tls,
            options=options,
            max_message_bytes=max_message_bytes,
            reconnect_max_delay=WATCH_RETRY_MAX_DELAY_S,
        )
        self._channels: dict[str, grpc.aio.Channel] = {}  # one per address used, kept until close()
        self.channel = channel or self._channel_to(self.targets[0])
        self._stubs()

    @property
    def target(self) -> str:
        """The address calls go to now."""
        return self.targets[self._at]

    def _channel_to(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = self._open(target)
        return channel

    def _stubs(self) -> None:
        self.runs = runs_pb2_grpc.RunServiceStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.state = state_pb2_grpc.StateServiceStub(self.channel)

    def _move_on(self, failed: str) -> None:
        """Moves to the address after `failed`, unless a concurrent call did already."""
        if len(self.targets) > 1 and self.target == failed:
            self._at = (self._at + 1) % len(self.targets)
            self.channel = self._channel_to(self.target)
            self._stubs()

    async def _connect(self) -> None:
        """With several addresses: makes the current one an address that
        answers, trying each in turn from the current one. When none does,
        the call that follows fails with UNAVAILABLE as it would with one."""
        for _ in range(len(self.targets) if len(self.targets) > 1 else 0):
            target, channel = self.target, self.channel
            state = channel.get_state(try_to_connect=True)
            while state in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING):
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.READY:
                return
            self._move_on(target)

    async def _rpc(self, call: Callable[[], Awaitable[T]], *, retry: bool) -> T:
        """`call()` on the current address; on UNAVAILABLE the client moves to
        the next address, and with `retry` (a read) calls again there, once
        around the list."""
        for left in reversed(range(len(self.targets))):
            await self._connect()
            target = self.target
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._move_on(target)
                if not retry or not left:
                    raise
        raise AssertionError("unreachable: the last try returns or raises")

    async def close(self) -> None:
        if self._owns_channel:
            for channel in self._channels.values():
                await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- runs ---------------------------------------------------------------------------

    @staticmethod
    def _start_request(
        pattern: Message,
        *,
        thread_id: str = "",
        agent_id: str = "",
        run_id: str = "",
        on_busy: str = "reject",
        budget: types_pb2.BudgetLimits | None = None,
        budget_id: str = "",
        state_scope: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
        initial_decisions: Iterable[types_pb2.ToolCallDecision] = (),
        resume: bool | None = None,
    ) -> runs_pb2.StartRunRequest:
        field = _PATTERN_FIELDS.get(pattern.DESCRIPTOR.full_name)
        if field is None:
            raise TypeError(f"{pattern.DESCRIPTOR.full_name} is not a run pattern")
        request = runs_pb2.StartRunRequest(
            thread_id=thread_id,
            agent_id=agent_id,
            run_id=run_id,
            on_busy=_ON_BUSY[on_busy],
            budget_id=budget_id,
            state_scope=state_scope,
            labels=dict(labels or {}),
            timeout_ms=int(timeout * 1000) if timeout else 0,
            initial_decisions=list(initial_decisions),
        )
        getattr(request, field).CopyFrom(pattern)
        if resume is not None:
            request.resume = resume
        if budget is not None:
            request.budget.CopyFrom(budget)
        return request

    async def session(self, pattern: Message, **options: Any) -> RunSession:
        """Starts a run on a RunService.Session stream (same options as start_run)."""
        request = self._start_request(pattern, **options)
        await self._connect()
        session = RunSession(self.runs.Session(), self.target)
        try:
            await session._open(request)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self._move_on(session.target)
            raise
        return session

    def run_stream(self) -> RunStream:
        """A RunStream: many runs over one stream (see RunStream)."""
        return RunStream(self)

    async def submit_decisions(
        self,
        *decisions: types_pb2.ToolCallDecision,
        run_id: str = "",
        thread_id: str = "",
        agent_id: str = "",
    ) -> runs_pb2.SubmitDecisionsResponse:
        request = runs_pb2.SubmitDecisionsRequest(
            run_id=run_id, thread_id=thread_id, agent_id=agent_id, decisions=decisions
        )
        response: runs_pb2.SubmitDecisionsResponse = await self._rpc(
            lambda: self.runs.SubmitDecisions(request), retry=False
        )
        return response

    async def start_run(
        self,
        pattern: Message,
        *,
        thread_id: str = "",
        agent_id: str = "",
        run_id: str = "",
        on_busy: str = "reject",
        budget: types_pb2.BudgetLimits | None = None,
        budget_id: str = "",
        state_scope: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
        initial_decisions: Iterable[types_pb2.ToolCallDecision] = (),
        resume: bool | None = None,
    ) -> types_pb2.RunHandle:
        """Starts a run of `pattern` (a SingleRun, MapReduceRun, ... message).
        `on_busy` is "reject", "interrupt" or "enqueue". `resume`: whether the run
        resumes after a sidecar restart (None: the sidecar's resume_runs setting)."""
        request = self._start_request(
            pattern,
            thread_id=thread_id,
            agent_id=agent_id,
            run_id=run_id,
            on_busy=on_busy,
            budget=budget,
            budget_id=budget_id,
            state_scope=state_scope,
            labels=labels,
            timeout=timeout,
            initial_decisions=initial_decisions,
            resume=resume,
        )
        response: runs_pb2.StartRunResponse = await self._rpc(lambda: self.runs.StartRun(request), retry=False)
        return response.run

    async def watch(
        self, run_id: str, after_seq: int = 0, *, reconnect_for: float = 30.0, resume_when_behind: bool = True
    ) -> AsyncIterator[RunEvent]:
        """A run's events from `after_seq` on, ending with its run_finished event.

        If the sidecar goes away (UNAVAILABLE), the watch resumes from the last
        event it delivered once the sidecar is back (with several addresses: at
        the next one), for up to `reconnect_for` seconds (0: never). If the caller consumes events so slowly that the
        sidecar ends the watch (RESOURCE_EXHAUSTED, see docs/runs.md), it
        resumes at once from the last event delivered, unless
        `resume_when_behind` is false. Any other status is raised, e.g.
        OUT_OF_RANGE when `after_seq` is past the run's last event (after a
        restart that lost events the watch had seen), FAILED_PRECONDITION when
        the events after it are no longer retained."""
        last = after_seq
        deadline = 0.0
        delay = 0.05
        while True:
            await self._connect()
            target = self.target
            try:
                async for batch in self.runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id, after_seq=last)):
                    deadline = 0.0
                    for event in batch.events:
                        last = event.seq
                        yield event
                return
            except grpc.aio.AioRpcError as err:
                now = asyncio.get_running_loop().time()
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and resume_when_behind and _resume_seq(err):
                    continue  # fell behind: every event up to `last` was delivered
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self._move_on(target)  # with several addresses, resume at the next
                if err.code() != grpc.StatusCode.UNAVAILABLE or reconnect_for <= 0:
                    raise
                deadline = deadline or now + reconnect_for
                if now >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_RETRY_MAX_DELAY_S)

    async def wait(self, run_id: str) -> runs_pb2.Run:
        """Waits until the run has finished and returns it (with its result).

        It follows the run from its newest event, not its first: a run with
        more events than the sidecar retains (or a reader slower than the run)
        is still waited for."""
        while True:
            run = await self.get_run(run_id)
            if run.status in _ENDED:
                return run
            try:
                async for _ in self.watch(run_id, max(run.last_seq - 1, 0)):
                    pass
            except grpc.aio.AioRpcError as err:
                # Fell behind the events retained, or asked past the last one
                # (a restart): look at the run again.
                if err.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE):
                    raise
                await asyncio.sleep(0.05)

    async def run(self, pattern: Message, **options: Any) -> runs_pb2.Run:
        """Starts a run and waits for it to finish.

        One Session stream carries the start and the events; if the sidecar goes
        away mid-run, the wait goes on as in wait()."""
        async with await self.session(pattern, **options) as session:
            try:
                async for _ in session.events():
                    pass
            except grpc.aio.AioRpcError as err:
                # The sidecar went away, or ended the session because its events
                # were read too slowly: follow the run with a watch instead.
                behind = err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _resume_seq(err) is not None
                if err.code() != grpc.StatusCode.UNAVAILABLE and not behind:
                    raise
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self._move_on(session.target)
                return await self.wait(session.handle.run_id)
        return await self.get_run(session.handle.run_id)

    async def get_run(self, run_id: str = "", *, thread_id: str = "") -> runs_pb2.Run:
        """The run, with its whole result once finished (a result too large to
        send inline is read with read_result)."""
        request = runs_pb2.GetRunRequest(run_id=run_id, thread_id=thread_id)
        response: runs_pb2.GetRunResponse = await self._rpc(lambda: self.runs.GetRun(request), retry=True)
        run = response.run
        if run.result_omitted:
            run.result.CopyFrom(await self.read_result(run.run_id))
        return run

    async def read_result(self, run_id: str) -> patterns_pb2.RunResult:
        """A finished run's result, read in pieces (RunService.ReadRunResult)."""

        async def read() -> bytes:
            pieces: list[bytes] = []
            async for response in self.runs.ReadRunResult(runs_pb2.ReadRunResultRequest(run_id=run_id)):
                pieces.append(response.chunk)
            return b"".join(pieces)

        return patterns_pb2.RunResult.FromString(await self._rpc(read, retry=True))

    async def list_runs(
        self, *, thread_id: str = "", status: int = 0, agent_id: str = "", page_size: int = 0
    ) -> list[runs_pb2.Run]:
        """Every retained run matching the filters, newest first (follows pages)."""
        runs: list[runs_pb2.Run] = []
        token = ""
        while True:
            request = runs_pb2.ListRunsRequest(
                thread_id=thread_id, status=status, agent_id=agent_id,  # type: ignore[arg-type]
                page_size=page_size, page_token=token,
            )
            response: runs_pb2.ListRunsResponse = await self._rpc(
                lambda: self.runs.ListRuns(request), retry=True  # noqa: B023 (awaited in this turn)
            )
            runs.extend(response.runs)
            token = response.next_page_token
            if not token:
                return runs

    async def cancel(
        self,
        run_id: str = "",
        *,
        thread_id: str = "",
        agent_id: str = "",
        reason: str = "",
        wait: bool = False,
    ) -> runs_pb2.CancelRunResponse:
        request = runs_pb2.CancelRunRequest(
            run_id=run_id, thread_id=thread_id, agent_id=agent_id, reason=reason, wait=wait
        )
        response: runs_pb2.CancelRunResponse = await self._rpc(lambda: self.runs.CancelRun(request), retry=False)
        return response

    # -- registry ---------------------------------------------------------------------

    async def register_agent(self, spec: types_pb2.AgentSpec, *, replace: bool = False) -> types_pb2.AgentSpec:
        request = registry_pb2.RegisterAgentRequest(agent=spec, replace=replace)
        response: registry_pb2.RegisterAgentResponse = await self._rpc(
            lambda: self.registry.RegisterAgent(request), retry=False
        )
        return response.agent

    async def list_workers(self) -> list[registry_pb2.WorkerInfo]:
        response: registry_pb2.ListWorkersResponse = await self._rpc(
            lambda: self.registry.ListWorkers(registry_pb2.ListWorkersRequest()), retry=True
        )
        return list(response.workers)

    # -- state ---------------------------------------------------------------------------

    async def get_state(self, scope: str, key: str, default: Any = None) -> Any:
        response: state_pb2.GetResponse = await self._rpc(
            lambda: self.state.Get(state_pb2.GetRequest(scope=scope, key=key)), retry=True
        )
        return from_value(response.value) if response.found else default

    async def set_state(self, scope: str, key: str, value: Any, *, writer: str = "") -> int:
        request = state_pb2.SetRequest(scope=scope, key=key, value=to_value(value), writer=writer)
        response: state_pb2.SetResponse = await self._rpc(lambda: self.state.Set(request), retry=False)
        return response.index
