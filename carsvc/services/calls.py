"""Runtime calls a running agent makes through its worker's stream.

Quick calls (state, emit, progress, mailbox send) are answered inline; calls
that wait (mailbox receive, delegate, spawn, consult, suspend) run in their own
task and answer when done. A failing call gets a CallError (or, without a
call_id, a FrameError); it never ends the session or touches other runs. A call
whose answer carries something (a value, keys, a message, an output, a
decision) must have a call_id: without one it is refused, not made. Every value
an argument carries is checked against max_field_bytes and max_value_depth."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from google.protobuf import empty_pb2, struct_pb2

from carsvc._proto.car.v1 import events_pb2, patterns_pb2, types_pb2, worker_pb2
from carsvc.domain.bounds import check_key, check_room, check_value_size
from carsvc.domain.errors import CarError, Code, FailedPrecondition, InvalidArgument
from carsvc.domain.infra import CallAnswer, RunningAgent
from carsvc.domain.tracing import NO_CALL, CallSpan, serving
from carsvc.domain.workers import Dispatcher, WorkerSession
from carsvc.services.errors import frame_error, shown

log = logging.getLogger("carsvc.calls")

CallResult = worker_pb2.CallResult
RuntimeCall = worker_pb2.RuntimeCall
_ACK = empty_pb2.Empty()
# A call id is echoed in its answer: a longer one is refused (so an answer never
# outgrows the frame that asked).
MAX_CALL_ID_CHARS = 256

# Calls a pattern serves through RunInfra.hooks, with the tool the caller's
# spec must list for the policy check.
_HOOKED = {
    "delegate": "delegate",
    "spawn_subtask": "spawn_subtask",
    "consult_advisor": "consult_advisor",
    "suspend_tool_call": None,  # the suspended tool itself must be allowed
}
# Calls whose answer is what the agent asked for: fire and forget makes no sense.
NEEDS_ANSWER = frozenset(
    {"state_get", "state_keys", "mailbox_recv", "delegate", "spawn_subtask", "consult_advisor", "suspend_tool_call"}
)


class ForwardedCalls:
    """An assignment's observer whose runtime calls are answered elsewhere (an
    agent this replica runs for another replica's run: services/peers.py)."""

    __slots__ = ()

    def forward(self, session: WorkerSession, call: RuntimeCall) -> None:
        raise NotImplementedError


def answer_result(answer: CallAnswer) -> CallResult:
    """The CallResult envelope for what a hook answered."""
    match answer:
        case types_pb2.AgentOutput():
            return CallResult(agent_output=answer)
        case patterns_pb2.AdvisorConsultation():
            return CallResult(consultation=answer)
        case types_pb2.ToolCallDecision():
            return CallResult(decision=answer)


def _copy_value(value: struct_pb2.Value) -> struct_pb2.Value:
    copy = struct_pb2.Value()
    copy.CopyFrom(value)
    return copy


class CallHandler:
    def __init__(
        self, dispatcher: Dispatcher, max_field_bytes: int, max_value_depth: int, max_state_keys: int
    ) -> None:
        self.dispatcher = dispatcher
        self.max_field_bytes = max_field_bytes
        self.max_value_depth = max_value_depth
        self.max_state_keys = max_state_keys
        self._tasks: dict[WorkerSession, set[asyncio.Task[None]]] = {}

    def handle(self, session: WorkerSession, call: RuntimeCall, index: int) -> None:
        field = f"calls[{index}]"
        if len(call.call_id) > MAX_CALL_ID_CHARS:
            if not session.closed:
                session.reply(
                    worker_pb2.FrameError(
                        code=int(Code.INVALID_ARGUMENT),
                        field=f"{field}.call_id",
                        message=f"is {len(call.call_id)} characters; the limit is {MAX_CALL_ID_CHARS}",
                    )
                )
            return
        op = call.WhichOneof("op")
        span: CallSpan = NO_CALL
        try:
            if op is None:
                raise InvalidArgument("must set one operation", field=f"{field}.op")
            if not call.call_id and op in NEEDS_ANSWER:
                raise InvalidArgument(
                    f"is required for {op} (its answer is the call's result); the call was not made",
                    field=f"{field}.call_id",
                )
            a = self.dispatcher.running(session, call.assignment_id)
            ctx = a.observer if a is not None else None
            if isinstance(ctx, ForwardedCalls):
                ctx.forward(session, call)  # its run's owner checks and answers it
                return
            if not isinstance(ctx, RunningAgent):  # None: work outside a run
                raise FailedPrecondition(
                    f"assignment '{shown(call.assignment_id)}' is not running on this worker session",
                    field=f"{field}.assignment_id",
                )
            arg = getattr(call, op)
            if op == "suspend_tool_call" and arg.HasField("arguments"):
                self._value(arg.arguments, f"{field}.{op}.arguments")
            span = ctx.span.call(op, arg)
            if op in _HOOKED:
                self._spawn(session, call, field, self._hooked(ctx, op, arg, field), ctx, span)
                return
            if op == "mailbox_recv":
                timeout = arg.timeout_ms / 1000 if arg.timeout_ms else ctx.infra.mailbox_recv_timeout
                self._spawn(session, call, field, self._recv(ctx, timeout), ctx, span)
                return
            result = self._quick(ctx, op, arg, f"{field}.{op}")
        except CarError as err:
            span.end(str(err))
            self._fail(session, call, field, err)
            return
        span.end()
        if call.call_id:
            result.call_id = call.call_id
            session.reply(result)

    def _quick(self, ctx: RunningAgent, op: str, arg: Any, field: str) -> CallResult:
        if op == "state_get":
            self._key(arg.key, field)
            value = ctx.state.get(arg.key)
            if not isinstance(value, struct_pb2.Value):
                return CallResult(state_get=worker_pb2.StateGetResult(found=False))
            return CallResult(state_get=worker_pb2.StateGetResult(found=True, value=value))
        if op == "state_set":
            self._key(arg.key, field)
            if not arg.HasField("value"):
                raise InvalidArgument("is required", field=f"{field}.value")
            self._value(arg.value, f"{field}.value")
            scope = ctx.infra.state  # the run's scope: an isolated agent's writes merge into it
            check_room(len(scope), arg.key in ctx.state, self.max_state_keys, f"{field}.key")
            t = ctx.state.set(arg.key, _copy_value(arg.value), ctx.name)
            return CallResult(state_write=worker_pb2.StateWriteResult(index=t.index, existed=t.old is not None))
        if op == "state_delete":
            self._key(arg.key, field)
            deleted = ctx.state.delete(arg.key, ctx.name)
            if deleted is None:
                return CallResult(state_write=worker_pb2.StateWriteResult(existed=False))
            return CallResult(state_write=worker_pb2.StateWriteResult(index=deleted.index, existed=True))
        if op == "state_keys":
            return CallResult(state_keys=worker_pb2.StateKeysResult(keys=ctx.state.keys(arg.prefix)))
        if op == "mailbox_send":
            message = types_pb2.Message()
            message.CopyFrom(arg.message)
            message.from_agent = ctx.name
            if message.HasField("payload"):
                self._value(message.payload, f"{field}.message.payload")
            if arg.broadcast:
                ctx.infra.mailbox.broadcast(message)
            else:
                if not message.to_agent:
                    raise InvalidArgument("must name the recipient", field=f"{field}.message.to_agent")
                ctx.infra.mailbox.send(message)
            return CallResult(ack=_ACK)
        if op == "emit":
            if not arg.kind:
                raise InvalidArgument("must not be empty", field=f"{field}.kind")
            if arg.HasField("payload"):
                self._value(arg.payload, f"{field}.payload")
            custom = events_pb2.CustomEvent(
                agent=ctx.name, assignment_id=ctx.assignment_id, kind=arg.kind
            )
            if arg.HasField("payload"):
                custom.payload.CopyFrom(arg.payload)
            ctx.infra.emit(events_pb2.RunEvent(custom=custom))
            return CallResult(ack=_ACK)
        if op == "progress":
            progress = events_pb2.AgentProgress(
                agent=ctx.name, assignment_id=ctx.assignment_id, message=arg.message
            )
            if arg.HasField("fraction"):
                if not 0.0 <= arg.fraction <= 1.0:
                    raise InvalidArgument(f"must be within 0..1, not {arg.fraction}", field=f"{field}.fraction")
                progress.fraction = arg.fraction
            ctx.infra.emit(events_pb2.RunEvent(progress=progress))
            return CallResult(ack=_ACK)
        raise InvalidArgument(f"unsupported operation '{op}'", field=field)

    async def _recv(self, ctx: RunningAgent, timeout: float) -> CallResult:
        message = await ctx.infra.mailbox.recv(ctx.name, timeout)
        return CallResult(message=message)

    async def _hooked(self, ctx: RunningAgent, op: str, arg: Any, field: str) -> CallResult:
        hook = ctx.infra.hooks.get(op)
        if hook is None:
            raise FailedPrecondition(
                f"'{op}' is not available to agents of this run's pattern", field=f"{field}.{op}"
            )
        tool = _HOOKED[op] or getattr(arg, "tool_name", "")
        if tool and tool not in ctx.tools:
            raise FailedPrecondition(
                f"agent '{ctx.name}' may not use tool '{tool}' (not in its spec's tools)",
                field=f"{field}.{op}",
                code=Code.PERMISSION_DENIED,
            )
        return answer_result(await hook(ctx, arg))

    def _spawn(
        self,
        session: WorkerSession,
        call: RuntimeCall,
        field: str,
        work: Awaitable[CallResult],
        ctx: RunningAgent,
        span: CallSpan = NO_CALL,
    ) -> None:
        tasks = self._tasks.setdefault(session, set())

        async def run() -> None:
            serving(span)  # agents the call runs (delegate, spawn, advisor) are its children
            try:
                result = await work
            except CarError as err:
                span.end(str(err))
                self._fail(session, call, field, err)
                return
            except asyncio.CancelledError:
                span.end("cancelled: " + (ctx.infra.cancel_reason or "the call's session or run ended"))
                raise
            except Exception as err:
                log.exception("runtime call %s failed", field)
                span.end(f"internal error: {err!r}")
                self._fail(session, call, field, CarError(f"internal error: {err!r}", code=Code.INTERNAL))
                return
            span.end(decision=result.decision if result.HasField("decision") else None)
            if call.call_id and not session.closed:
                result.call_id = call.call_id
                session.reply(result)

        task = asyncio.get_running_loop().create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        ctx.infra.track(task)

    def session_closed(self, session: WorkerSession) -> None:
        for task in self._tasks.pop(session, ()):
            task.cancel()

    @staticmethod
    def _fail(session: WorkerSession, call: RuntimeCall, field: str, err: CarError) -> None:
        if session.closed:
            return
        if call.call_id:
            session.reply(
                CallResult(call_id=call.call_id, error=worker_pb2.CallError(code=int(err.code), message=str(err)))
            )
        else:
            session.reply(frame_error(err, field))

    @staticmethod
    def _key(key: str, field: str) -> None:
        check_key(key, f"{field}.key")

    def _value(self, value: struct_pb2.Value, field: str) -> None:
        check_value_size(value, field, self.max_field_bytes, self.max_value_depth)
