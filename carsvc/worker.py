"""Write a carsvc worker in Python.

    from carsvc.worker import Worker

    worker = Worker("127.0.0.1:50051", max_in_flight=8)

    @worker.agent("summarizer")
    async def summarize(ctx):
        ctx.progress("reading")
        seen = await ctx.state.get("seen") or 0
        await ctx.state.set("seen", seen + 1)
        return f"summary of {ctx.task!r}"

    worker.serve()  # until Ctrl-C or SIGTERM; `await worker.run()` inside an event loop

A handler gets an AgentContext and returns the answer (a str), a Result, or an
AgentOutput. An exception becomes the output's error; cancellation by the
sidecar cancels the handler's task. Heartbeats, batching of results and calls,
and reconnecting after the sidecar restarts (a crash, or a drain before a
graceful restart) are handled here. Given several sidecar addresses (replicas
sharing one store), the worker connects to the first that answers and, when
that session ends, reconnects to the next. A refused credential is final: run()
raises WorkerRefused instead of reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from carsvc._proto.car.v1 import patterns_pb2, types_pb2, worker_pb2
from carsvc._version import __version__
from carsvc.security.channel import DEFAULT_MAX_MESSAGE_BYTES, TLS, addresses, bearer_metadata, open_channel
from carsvc.values import from_value, to_value

__all__ = ["AgentContext", "Decision", "Result", "RuntimeCallError", "UndecodableFrame", "Worker", "WorkerRefused"]

log = logging.getLogger("carsvc.worker")

AgentOutput = types_pb2.AgentOutput
SDK = f"carsvc-python/{__version__}"


@dataclass
class Result:
    """What a handler may return instead of a bare answer."""

    answer: str = ""
    error: str | None = None
    turns: int = 1
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    tools_used: list[str] = field(default_factory=list)

    def to_output(self, name: str, duration_ms: float) -> AgentOutput:
        out = AgentOutput(
            name=name,
            answer=self.answer,
            turns=self.turns,
            tool_calls=self.tool_calls,
            duration_ms=duration_ms,
            tools_used=self.tools_used,
        )
        if self.error is not None:
            out.error = self.error
        if self.input_tokens or self.output_tokens or self.cost_usd:
            out.tokens.input_tokens = self.input_tokens
            out.tokens.output_tokens = self.output_tokens
            out.tokens.cost_usd = self.cost_usd
        return out


@dataclass(frozen=True)
class Decision:
    """A client's answer to a suspended tool call."""

    approved: bool  # resume (True) or cancel (False)
    result: Any  # the value a resume carries
    reason: str
    decision_id: str

    @classmethod
    def from_proto(cls, msg: types_pb2.ToolCallDecision) -> Decision:
        return cls(
            approved=msg.action == types_pb2.DECISION_ACTION_RESUME,
            result=from_value(msg.result) if msg.HasField("result") else None,
            reason=msg.reason,
            decision_id=msg.decision_id,
        )


class RuntimeCallError(Exception):
    """The sidecar refused a runtime call; `code` is a gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class WorkerRefused(Exception):
    """The sidecar refused the worker's credentials: Connect ended with
    UNAUTHENTICATED (a missing or wrong worker token, or a token of the client
    scope) or PERMISSION_DENIED. Retrying cannot fix a credential, so
    Worker.run() raises this instead of reconnecting. `code` is the gRPC status
    code, `details` the sidecar's message (which never contains the token)."""

    def __init__(self, code: grpc.StatusCode, details: str, target: str) -> None:
        super().__init__(
            f"the sidecar at {target} refused the worker's credentials ({code.name}: {details}); "
            "check the worker token"
        )
        self.code = code
        self.details = details
        self.target = target


class UndecodableFrame(Exception):
    """The sidecar sent a frame this SDK cannot decode (a newer contract, a
    value nested beyond protobuf's limit, or corrupt bytes). The session ends
    and the worker reconnects; what it held goes back to the sidecar."""


def _decode_frame(data: bytes) -> worker_pb2.ConnectResponse | UndecodableFrame:
    # grpc turns a deserializer's exception into a None message and an ERROR log
    # line without the cause; returning the error keeps it for a clear message.
    try:
        return worker_pb2.ConnectResponse.FromString(data)
    except DecodeError as err:
        return UndecodableFrame(f"could not decode a frame from the sidecar ({len(data)} bytes): {err}")


_CONNECT = "/car.v1.WorkerService/Connect"

# Statuses of the Connect stream that no reconnect can fix.
REFUSED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_CODES = {c.value[0]: c for c in grpc.StatusCode}

Handler = Callable[["AgentContext"], Awaitable[Any]]


class StateView:
    """The running agent's state (its overlay when the pattern isolates it)."""

    def __init__(self, ctx: AgentContext) -> None:
        self._ctx = ctx

    async def get(self, key: str, default: Any = None) -> Any:
        r = await self._ctx.call(worker_pb2.RuntimeCall(state_get=worker_pb2.StateGetCall(key=key)))
        return from_value(r.state_get.value) if r.state_get.found else default

    async def set(self, key: str, value: Any) -> int:
        """Writes `key`; returns the transition index."""
        r = await self._ctx.call(
            worker_pb2.RuntimeCall(state_set=worker_pb2.StateSetCall(key=key, value=to_value(value)))
        )
        return r.state_write.index

    async def delete(self, key: str) -> bool:
        """Deletes `key`; returns whether it existed."""
        r = await self._ctx.call(worker_pb2.RuntimeCall(state_delete=worker_pb2.StateDeleteCall(key=key)))
        return r.state_write.existed

    async def keys(self, prefix: str = "") -> list[str]:
        r = await self._ctx.call(worker_pb2.RuntimeCall(state_keys=worker_pb2.StateKeysCall(prefix=prefix)))
        return list(r.state_keys.keys)


class AgentContext:
    """One assignment as its handler sees it."""

    def __init__(self, link: _Link, assignment: worker_pb2.Assignment) -> None:
        self._link = link
        self.assignment = assignment
        self.assignment_id = assignment.assignment_id
        self.attempt = assignment.attempt
        self.run_id = assignment.run_id
        self.thread_id = assignment.thread_id
        self.spec = assignment.spec
        self.name = assignment.spec.name
        self.agent = assignment.agent or assignment.spec.name
        self.task = assignment.task
        self.state = StateView(self)
        # Why the sidecar cancelled this assignment (its AssignmentCancel.reason:
        # the client's reason, a timeout, a restart …); empty unless it did.
        self.cancel_reason = ""

    async def call(self, call: worker_pb2.RuntimeCall) -> worker_pb2.CallResult:
        """Makes a runtime call and waits for its result (raises RuntimeCallError)."""
        call.assignment_id = self.assignment_id
        return await self._link.call(call)

    def _fire(self, call: worker_pb2.RuntimeCall) -> None:
        call.assignment_id = self.assignment_id
        self._link.outbox.add_call(call)

    async def send(self, to: str, payload: Any, kind: int = types_pb2.MESSAGE_KIND_CUSTOM) -> None:
        """Sends a message to another agent of the run."""
        message = types_pb2.Message(to_agent=to, kind=kind, payload=to_value(payload))  # type: ignore[arg-type]
        await self.call(worker_pb2.RuntimeCall(mailbox_send=worker_pb2.MailboxSendCall(message=message)))

    async def broadcast(self, payload: Any, kind: int = types_pb2.MESSAGE_KIND_CUSTOM) -> None:
        message = types_pb2.Message(kind=kind, payload=to_value(payload))  # type: ignore[arg-type]
        await self.call(
            worker_pb2.RuntimeCall(mailbox_send=worker_pb2.MailboxSendCall(message=message, broadcast=True))
        )

    async def recv(self, timeout: float | None = None) -> types_pb2.Message:
        """Waits for the next message to this agent (the sidecar's default timeout
        when None); raises RuntimeCallError(DEADLINE_EXCEEDED) on timeout."""
        timeout_ms = int(timeout * 1000) if timeout else 0
        r = await self.call(worker_pb2.RuntimeCall(mailbox_recv=worker_pb2.MailboxRecvCall(timeout_ms=timeout_ms)))
        return r.message

    async def suspend_tool_call(
        self,
        tool_call_id: str,
        tool_name: str,
        arguments: Any = None,
        *,
        reason: str = "",
        timeout: float | None = None,
    ) -> Decision:
        """Suspends a tool call until a client approves or denies it (human in
        the loop). The tool must be in the agent's spec. The run is WAITING
        meanwhile; after `timeout` (default: the sidecar's) the call is cancelled."""
        call = worker_pb2.RuntimeCall(
            suspend_tool_call=worker_pb2.SuspendToolCall(
                tool_call_id=tool_call_id,
                tool_name=tool_name,
                reason=reason,
                timeout_ms=int(timeout * 1000) if timeout else 0,
            )
        )
        if arguments is not None:
            call.suspend_tool_call.arguments.CopyFrom(to_value(arguments))
        r = await self.call(call)
        return Decision.from_proto(r.decision)

    def emit(self, kind: str, payload: Any = None) -> None:
        """Appends a custom event to the run's stream (fire and forget)."""
        call = worker_pb2.RuntimeCall(emit=worker_pb2.EmitEventCall(kind=kind))
        if payload is not None:
            call.emit.payload.CopyFrom(to_value(payload))
        self._fire(call)

    def progress(self, message: str, fraction: float | None = None) -> None:
        """Reports progress to the run's watchers (fire and forget)."""
        call = worker_pb2.RuntimeCall(progress=worker_pb2.ProgressCall(message=message))
        if fraction is not None:
            call.progress.fraction = fraction
        self._fire(call)

    # -- pattern tools: the sidecar runs the other agent and answers ------------------

    async def delegate(self, specialist: str, subtask: str) -> AgentOutput:
        """Hands `subtask` to a named specialist (delegator pattern) and returns
        its output. An unknown specialist raises RuntimeCallError(NOT_FOUND); a
        specialist that failed, or that the budget refused, is an output with
        `error` set."""
        r = await self.call(
            worker_pb2.RuntimeCall(delegate=worker_pb2.DelegateCall(specialist=specialist, subtask=subtask))
        )
        return r.agent_output

    async def spawn_subtask(self, task: str, tools: Iterable[str] = (), name: str = "") -> AgentOutput:
        """Spawns an ephemeral sub-agent with a subset of this agent's tools
        (spawn_subtask pattern) and returns its output. A tool this agent does
        not have raises RuntimeCallError(PERMISSION_DENIED)."""
        r = await self.call(
            worker_pb2.RuntimeCall(
                spawn_subtask=worker_pb2.SpawnSubtaskCall(task=task, tools=list(tools), name=name)
            )
        )
        return r.agent_output

    async def consult_advisor(self, prompt: str) -> patterns_pb2.AdvisorConsultation:
        """Asks the run's advisor (advisor pattern) for a verdict. Past the
        allowance raises RuntimeCallError(RESOURCE_EXHAUSTED, "advisor exhausted: ...")."""
        r = await self.call(
            worker_pb2.RuntimeCall(consult_advisor=worker_pb2.ConsultAdvisorCall(prompt=prompt))
        )
        return r.consultation


class _Outbox:
    """Results and calls waiting for the next frame; one frame carries them all."""

    def __init__(self) -> None:
        self.results: list[worker_pb2.AssignmentResult] = []
        self.calls: list[worker_pb2.RuntimeCall] = []
        self.ready = asyncio.Event()
        self.closed = False

    def add_result(self, result: worker_pb2.AssignmentResult) -> None:
        self.results.append(result)
        self.ready.set()

    def add_call(self, call: worker_pb2.RuntimeCall) -> None:
        self.calls.append(call)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    def take(self) -> worker_pb2.ConnectRequest:
        frame = worker_pb2.ConnectRequest(results=self.results, calls=self.calls)
        self.results, self.calls = [], []
        return frame


class _Link:
    """One connected session: its outbox and the calls waiting for answers."""

    def __init__(self) -> None:
        self.outbox = _Outbox()
        self.pending: dict[str, asyncio.Future[worker_pb2.CallResult]] = {}
        self._ids = (str(n) for n in itertools.count(1))
        self.heartbeat_s = 5.0
        self.session_id = ""
        self.draining = False

    async def call(self, call: worker_pb2.RuntimeCall) -> worker_pb2.CallResult:
        if self.outbox.closed:
            raise ConnectionError("the worker's session with the sidecar has ended")
        call.call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[call.call_id] = future
        self.outbox.add_call(call)
        try:
            result: worker_pb2.CallResult = await future
        finally:
            self.pending.pop(call.call_id, None)
        if result.HasField("error"):
            code = _CODES.get(result.error.code, grpc.StatusCode.UNKNOWN)
            raise RuntimeCallError(code, result.error.message)
        return result

    def fail_pending(self, reason: str) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(reason))
        self.pending.clear()


class Worker:
    """A worker process's connection to the sidecar."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        worker_id: str | None = None,
        max_in_flight: int = 1,
        labels: dict[str, str] | None = None,
        reconnect: bool = True,
        reconnect_max_delay: float = 5.0,
        stop_on_drain: bool = False,
        channel_options: list[tuple[str, Any]] | None = None,
        token: str | None = None,
        tls: TLS | bool | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_connect: Callable[[str], None] | None = None,
    ) -> None:
        """`target`: the sidecar's "host:port", or several replicas' addresses
        (a list, or one string with commas: "h1:50051,h2:50051"); each
        connection attempt goes to the next address in turn, starting with the
        first. `reconnect`: after the stream ends (the sidecar crashed, or
        drained this worker because it is restarting), connect again with
        backoff from 0.1 s up to `reconnect_max_delay` (one backoff across all
        addresses), so a sidecar that comes back is reached at most
        `reconnect_max_delay` seconds later (gRPC's own channel backoff is
        capped at the same delay); without it run() returns when the first
        session ends. `stop_on_drain`: return from run() after a drain
        instead of reconnecting. `token`: a worker token, sent as
        `authorization: Bearer` metadata on the stream; a refused one makes
        run() raise WorkerRefused. `tls`: a carsvc.security.TLS (True: TLS with
        the system's roots); plaintext by default. `max_message_bytes`: the
        largest message the worker sends or accepts (the sidecar's default
        max_message_bytes, 16 MiB). `channel_options`: extra gRPC channel
        arguments, which win over the SDK's. `on_connect`: called with the
        session id after every welcome (`target` is then the address)."""
        self.targets = addresses(target)
        # The address of the current (or last) session.
        self.target = self.targets[0]
        self.tls = tls
        self._metadata = bearer_metadata(token)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.max_in_flight = max_in_flight
        self.labels = dict(labels or {})
        self.reconnect = reconnect
        self.reconnect_max_delay = reconnect_max_delay
        self.stop_on_drain = stop_on_drain
        self.channel_options = channel_options or []
        self.max_message_bytes = max_message_bytes
        self.on_connect = on_connect
        self._handlers: dict[str, Handler] = {}
        self._running: dict[str, tuple[asyncio.Task[None], AgentContext]] = {}
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self.session_id = ""
        self.completed = 0
        self._connected_at: float | None = None  # when the current session was welcomed

    # -- registration ---------------------------------------------------------

    def agent(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: serve agent `name` (an exact name or a glob like `mapper*`)."""

        def register(handler: Handler) -> Handler:
            self.add_agent(name, handler)
            return handler

        return register

    def add_agent(self, name: str, handler: Handler) -> None:
        if not name:
            raise ValueError("an agent name or glob must not be empty")
        self._handlers[name] = handler

    def _handler_for(self, agent: str) -> Handler | None:
        handler = self._handlers.get(agent)
        if handler is None:
            for pattern, candidate in self._handlers.items():
                if fnmatch.fnmatchcase(agent, pattern):
                    return candidate
        return handler

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        """Serves until stop(). Reconnects with backoff after the stream ends,
        whether the sidecar crashed or drained this worker (a graceful restart).
        Returns instead after a drain with `stop_on_drain`, and after the first
        session without `reconnect`. Raises WorkerRefused, without retrying,
        when the sidecar refuses the worker's credentials."""
        if not self._handlers:
            raise RuntimeError("register at least one agent before run()")
        first_delay = min(0.1, self.reconnect_max_delay)
        delay, attempt = first_delay, 0
        for turn in itertools.count():
            if self._stopping.is_set():
                return
            # Every attempt goes to the next address: a replica that died or
            # drained this worker is tried again only after the others.
            self.target = self.targets[turn % len(self.targets)]
            self._connected_at = None
            drained = False
            ended = "the stream closed"  # what ended the session, for the log
            try:
                drained = await self._session()
            except grpc.aio.AioRpcError as err:
                if err.code() in REFUSED_CODES:
                    refused = WorkerRefused(err.code(), err.details() or "", self.target)
                    log.error("worker %s: %s; not reconnecting", self.worker_id, refused)
                    raise refused from err
                ended = f"{err.code().name} {err.details()}"
            except UndecodableFrame as err:
                log.error("worker %s: %s; reconnecting", self.worker_id, err)
                ended = "undecodable frame"
            if self._stopping.is_set() or not self.reconnect or (drained and self.stop_on_drain):
                return
            if self._connected_at is not None and time.monotonic() - self._connected_at > 10:
                delay, attempt = first_delay, 0  # after a long session, start the backoff over
            attempt += 1
            # One line per reconnect attempt, with the wait before it (no traceback).
            log.log(
                logging.INFO if drained else logging.WARNING,
                "worker %s: %s; reconnecting in %.1f s (attempt %d)",
                self.worker_id, "drained" if drained else f"session ended: {ended} (at {self.target})", delay, attempt,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self.reconnect_max_delay)

    async def stop(self) -> None:
        """Stops serving: running handlers are cancelled, the stream is closed."""
        self._stopping.set()

    def serve(self) -> None:
        """Runs the worker until SIGINT (Ctrl-C) or SIGTERM: the blocking entry
        point of a worker program. A signal stops it as stop() does, and serve()
        returns without a traceback (a script that ends there exits 0). A
        refused credential ends the program: the refusal is logged in one line
        and serve() raises SystemExit(1) (run() raises WorkerRefused instead,
        for a program that handles it). A program that set up no logging gets
        the worker's INFO lines (connected, reconnecting) on stderr."""
        handler = None
        if not logging.getLogger().handlers and not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            if log.level == logging.NOTSET:
                log.setLevel(logging.INFO)
        try:
            asyncio.run(self._serve())
        except WorkerRefused:
            raise SystemExit(1) from None  # run() logged the refusal
        finally:
            if handler is not None:
                log.removeHandler(handler)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _session(self) -> bool:
        """One connection; returns True when the sidecar drained us."""
        link = _Link()
        drained = False
        async with open_channel(
            self.target,
            tls=self.tls,
            options=self.channel_options,
            max_message_bytes=self.max_message_bytes,
            reconnect_max_delay=self.reconnect_max_delay,
        ) as channel:
            connect = channel.stream_stream(
                _CONNECT,
                request_serializer=worker_pb2.ConnectRequest.SerializeToString,
                response_deserializer=_decode_frame,
            )
            call = connect(self._frames(link), metadata=self._metadata)
            stopper = asyncio.get_running_loop().create_task(self._stopping.wait())
            reader = asyncio.ensure_future(self._read(call, link))
            try:
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    drained = reader.result()
            finally:
                stopper.cancel()
                link.outbox.close()
                link.fail_pending("the worker's session with the sidecar has ended")
                for task, _ in list(self._running.values()):
                    task.cancel()
                if self._running:
                    await asyncio.wait([t for t, _ in self._running.values()], timeout=1.0)
                if not reader.done():
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await reader
                self.connected.clear()
        return drained

    async def _frames(self, link: _Link) -> AsyncIterator[worker_pb2.ConnectRequest]:
        yield worker_pb2.ConnectRequest(
            hello=worker_pb2.WorkerHello(
                worker_id=self.worker_id,
                agents=list(self._handlers),
                max_in_flight=self.max_in_flight,
                labels=self.labels,
                sdk=SDK,
            )
        )
        outbox = link.outbox
        while True:
            if not (outbox.results or outbox.calls or outbox.closed):
                try:
                    await asyncio.wait_for(outbox.ready.wait(), link.heartbeat_s)
                except TimeoutError:
                    yield worker_pb2.ConnectRequest(heartbeat=worker_pb2.Heartbeat())
                    continue
            outbox.ready.clear()
            if outbox.results or outbox.calls:
                yield outbox.take()
            if outbox.closed:
                return

    async def _read(self, call: Any, link: _Link) -> bool:
        async for frame in call:
            if not isinstance(frame, worker_pb2.ConnectResponse):
                raise frame if isinstance(frame, UndecodableFrame) else UndecodableFrame(f"got {frame!r}")
            if frame.HasField("welcome"):
                link.session_id = self.session_id = frame.welcome.session_id
                self._connected_at = time.monotonic()
                if frame.welcome.heartbeat_interval_ms:
                    # Send well within the interval so one slow frame never lapses us.
                    link.heartbeat_s = frame.welcome.heartbeat_interval_ms / 1000 / 2
                    # The frame writer waits with the interval it had before the welcome
                    # (5 s): wake it, so a sidecar with a shorter one never sees us lapse.
                    link.outbox.ready.set()
                self.connected.set()
                log.info(
                    "worker %s: connected to %s (session %s), serving %s",
                    self.worker_id, self.target, self.session_id, ", ".join(self._handlers),
                )
                if self.on_connect is not None:
                    self.on_connect(self.session_id)
            for assignment in frame.assignments:
                self._start(link, assignment)
            for cancel in frame.cancels:
                entry = self._running.get(cancel.assignment_id)
                if entry is not None:
                    entry[1].cancel_reason = cancel.reason or "cancelled by the sidecar"
                    entry[0].cancel()
            for result in frame.call_results:
                future = link.pending.get(result.call_id)
                if future is not None and not future.done():
                    future.set_result(result)
            for error in frame.errors:
                log.warning("worker %s: sidecar refused %s: %s", self.worker_id, error.field, error.message)
            if frame.HasField("drain"):
                link.draining = True
                log.info("worker %s: draining (%s), at %s", self.worker_id, frame.drain.reason, self.target)
                if not self._running:
                    link.outbox.close()
        return link.draining

    def _start(self, link: _Link, assignment: worker_pb2.Assignment) -> None:
        ctx = AgentContext(link, assignment)
        task = asyncio.get_running_loop().create_task(self._execute(link, ctx))
        self._running[assignment.assignment_id] = (task, ctx)

    async def _execute(self, link: _Link, ctx: AgentContext) -> None:
        started = time.perf_counter()
        handler = self._handler_for(ctx.agent)
        span = _AgentSpan.start(ctx, self.worker_id)  # None unless the program uses OpenTelemetry
        output = None
        try:
            if handler is None:
                raise LookupError(f"this worker has no handler for agent '{ctx.agent}'")
            value = await handler(ctx)
            output = handler_output(value, ctx.name, (time.perf_counter() - started) * 1000)
        except asyncio.CancelledError:
            reason = ctx.cancel_reason or "cancelled by the worker"
            output = AgentOutput(name=ctx.name, error=f"cancelled: {reason}")
        except Exception as err:
            output = AgentOutput(name=ctx.name, error=f"{type(err).__name__}: {err}")
            output.duration_ms = (time.perf_counter() - started) * 1000
        finally:
            self._running.pop(ctx.assignment_id, None)
            if span is not None:
                span.end(output)
        self.completed += 1
        if not link.outbox.closed:
            link.outbox.add_result(
                worker_pb2.AssignmentResult(assignment_id=ctx.assignment_id, attempt=ctx.attempt, output=output)
            )
            if link.draining and not self._running:
                link.outbox.close()


class _AgentSpan:
    """The agent's span on this worker, when the program uses OpenTelemetry
    (it imported opentelemetry and, to export, set up a tracer provider): a
    child of the sidecar's step span (the assignment's trace_context), and the
    current span while the handler runs, so the spans of the handler's own
    work (model calls, tools) are its children. This SDK never imports
    OpenTelemetry itself: a program that does not use it pays nothing."""

    __slots__ = ("otel", "span", "token")

    def __init__(self, otel: Any, span: Any, token: Any) -> None:
        self.otel = otel
        self.span = span
        self.token = token

    @classmethod
    def start(cls, ctx: AgentContext, worker_id: str) -> _AgentSpan | None:
        otel = sys.modules.get("opentelemetry.trace")
        if otel is None:
            return None
        from opentelemetry import context as otel_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = ctx.assignment.trace_context
        parent = TraceContextTextMapPropagator().extract(dict(carrier)) if carrier else None
        span = otel.get_tracer("carsvc.worker", __version__).start_span(
            f"invoke_agent {ctx.name}",
            context=parent,
            kind=otel.SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": ctx.name,
                "gen_ai.conversation.id": ctx.thread_id,
                "carsvc.run.id": ctx.run_id,
                "carsvc.assignment.id": ctx.assignment_id,
                "carsvc.attempt": ctx.attempt,
                "carsvc.worker.id": worker_id,
            },
        )
        return cls(otel, span, otel_context.attach(otel.set_span_in_context(span)))

    def end(self, output: AgentOutput | None) -> None:
        from opentelemetry import context as otel_context

        span = self.span
        if output is not None and span.is_recording():
            if output.HasField("tokens"):
                span.set_attribute("gen_ai.usage.input_tokens", output.tokens.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", output.tokens.output_tokens)
                span.set_attribute("carsvc.usage.cost_usd", output.tokens.cost_usd)
            if output.HasField("error"):
                span.set_status(self.otel.Status(self.otel.StatusCode.ERROR, output.error))
                span.set_attribute("error.type", "cancelled" if output.error.startswith("cancelled") else "agent_error")
        span.end()
        otel_context.detach(self.token)


def handler_output(value: Any, name: str, duration_ms: float) -> AgentOutput:
    """What a handler returned (an answer, a Result or an AgentOutput) as the output sent."""
    if isinstance(value, AgentOutput):
        if not value.name:
            value.name = name
        return value
    if isinstance(value, Result):
        return value.to_output(name, duration_ms)
    if isinstance(value, str):
        return AgentOutput(name=name, answer=value, turns=1, duration_ms=duration_ms)
    raise TypeError(f"a handler must return str, Result or AgentOutput, not {type(value).__name__}")
