"""WorkerService: the worker protocol's stream, adapted onto the Dispatcher.

No frame is dropped silently: every result the dispatcher does not take (an
unknown assignment, a wrong or superseded attempt, a duplicate, an output too
large or nested too deep) is answered with a FrameError naming the field."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from carsvc._proto.car.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from carsvc.domain.bounds import check_output_values
from carsvc.domain.errors import CarError, Code, InvalidArgument
from carsvc.domain.workers import Assignment, Dispatcher, State, Verdict, WorkerSession
from carsvc.services.calls import CallHandler
from carsvc.services.errors import abort, shown

log = logging.getLogger("carsvc.workers")

ConnectRequest = worker_pb2.ConnectRequest
ConnectResponse = worker_pb2.ConnectResponse

# What one entry of a repeated field costs in a frame besides its own bytes (a
# tag and a length), and what a frame keeps free for its drain notice.
_ENTRY_OVERHEAD = 6
_FRAME_SLACK = 1024


def undecodable(err: DecodeError) -> CarError:
    """The error ending a stream whose worker sent bytes that are not a ConnectRequest."""
    return InvalidArgument(f"is not a valid {ConnectRequest.DESCRIPTOR.full_name} ({err})", field="frame")


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        dispatcher: Dispatcher,
        calls: CallHandler,
        *,
        heartbeat_interval_ms: int,
        heartbeat_misses: int,
        max_message_bytes: int,
        max_output_bytes: int,
        max_value_depth: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.calls = calls
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_misses = heartbeat_misses
        self.max_message_bytes = max_message_bytes
        self.max_output_bytes = max_output_bytes
        self.max_value_depth = max_value_depth

    async def Connect(
        self,
        request_iterator: AsyncIterator[ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ConnectResponse]:
        frames = aiter(request_iterator)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return
        except DecodeError as err:
            await abort(context, undecodable(err))
        if not first.HasField("hello"):
            await abort(
                context, CarError("the first frame must carry hello", field="hello", code=Code.INVALID_ARGUMENT)
            )
        hello = first.hello
        try:
            session = self.dispatcher.open_session(
                hello.worker_id, hello.agents, hello.max_in_flight, dict(hello.labels), hello.sdk
            )
        except CarError as err:
            await abort(context, err)
        yield ConnectResponse(
            welcome=worker_pb2.WorkerWelcome(
                session_id=session.session_id,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                heartbeat_misses=self.heartbeat_misses,
                max_in_flight=session.max_in_flight,
                max_message_bytes=self.max_message_bytes,
            )
        )
        self.handle(session, first, first_frame=True)
        reader = asyncio.get_running_loop().create_task(self._read(session, frames))
        drain_sent = False
        try:
            while True:
                await session.wakeup.wait()
                session.wakeup.clear()
                frames_out = self.frames(session)
                if session.drain_notice is not None and not drain_sent:
                    drain_sent = True
                    reason, grace_ms = session.drain_notice
                    if not frames_out:
                        frames_out.append(ConnectResponse())
                    frames_out[-1].drain.reason = reason
                    frames_out[-1].drain.grace_ms = grace_ms
                for frame in frames_out:
                    yield frame
                if session.closed:
                    break
        finally:
            reader.cancel()
            self.calls.session_closed(session)
            self.dispatcher.close_session(session, "the stream ended")
        error = reader.result() if reader.done() and not reader.cancelled() else None
        if error is not None:
            await abort(context, error)
        if session.close_reason.startswith("no frame"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session closed: {session.close_reason}")

    async def _read(self, session: WorkerSession, frames: AsyncIterator[ConnectRequest]) -> CarError | None:
        """Handles the worker's frames until its stream ends; returns the error
        to end the stream with, if any."""
        reason = "the worker closed its stream"
        error: CarError | None = None
        try:
            async for frame in frames:
                session.touch()
                try:
                    self.handle(session, frame)
                except Exception as err:  # a bug in the sidecar: say so, do not end quietly
                    log.exception("handling a frame of worker %s failed", session.worker_id)
                    error = CarError(f"internal error handling a frame: {err!r}", code=Code.INTERNAL)
                    reason = str(error)
                    break
        except asyncio.CancelledError:
            raise
        except DecodeError as err:
            error = undecodable(err)
            reason = f"the worker sent an undecodable frame ({err})"
        except Exception as err:  # the stream broke (worker died, network)
            reason = f"the stream broke: {err!r}"
        self.dispatcher.close_session(session, reason)
        return error

    def handle(self, session: WorkerSession, frame: ConnectRequest, *, first_frame: bool = False) -> None:
        if not first_frame and frame.HasField("hello"):
            session.reply(
                worker_pb2.FrameError(
                    code=int(Code.INVALID_ARGUMENT),
                    field="hello",
                    message="hello may only be sent in the first frame; it was ignored",
                )
            )
        # Calls first: an agent's last calls travel in the frame that carries its
        # result, and must be served while its assignment is still running.
        for i, call in enumerate(frame.calls):
            self.calls.handle(session, call, i)
        for i, result in enumerate(frame.results):
            self._result(session, result, i)

    def _result(self, session: WorkerSession, result: worker_pb2.AssignmentResult, i: int) -> None:
        at = f"results[{i}]"
        if result.attempt == 0:
            session.reply(
                worker_pb2.FrameError(
                    code=int(Code.INVALID_ARGUMENT),
                    field=f"{at}.attempt",
                    message="must echo the assignment's attempt (1 or more)",
                )
            )
            return
        output = result.output
        refused = self._check_output(output, f"{at}.output")
        if refused is not None:
            # Nothing undecodable is stored or re-sent: the agent's output becomes
            # an error saying why, so its run goes on (and ends) as for any failure.
            # (Named by the dispatcher after the agent: the worker's name may be
            # what made the output too large.)
            output = types_pb2.AgentOutput(error=f"the worker's output was refused: {refused}")
            if result.output.HasField("tokens"):
                output.tokens.CopyFrom(result.output.tokens)
        verdict = self.dispatcher.complete(session, result.assignment_id, result.attempt, output)
        error = self._refusal(verdict, result, at)
        if error is None and refused is not None and verdict is Verdict.ACCEPTED:
            error = worker_pb2.FrameError(
                code=int(refused.code),
                field=refused.field,
                message=f"{refused.detail}; the agent's output is an error saying so",
            )
        if error is not None:
            session.reply(error)
        if verdict is Verdict.SUPERSEDED:
            log.debug(
                "answered a late result for %s attempt %d from %s: superseded",
                shown(result.assignment_id), result.attempt, session.worker_id,
            )

    def _check_output(self, output: types_pb2.AgentOutput, field: str) -> CarError | None:
        """Why `output` may not be taken (too large, nested too deep), if it may not."""
        size = output.ByteSize()
        if size > self.max_output_bytes:
            return InvalidArgument(
                f"is {size} bytes; the limit is {self.max_output_bytes} (max_output_bytes)", field=field
            )
        try:
            check_output_values(output, field, self.max_value_depth)
        except CarError as err:
            return err
        return None

    def _refusal(
        self, verdict: Verdict, result: worker_pb2.AssignmentResult, at: str
    ) -> worker_pb2.FrameError | None:
        """The FrameError telling a worker why its result was not taken."""
        aid, attempt = shown(result.assignment_id), result.attempt
        if verdict in (Verdict.ACCEPTED, Verdict.CANCEL_ACKNOWLEDGED):
            return None
        if verdict is Verdict.UNKNOWN:
            return worker_pb2.FrameError(
                code=int(Code.NOT_FOUND), field=f"{at}.assignment_id", message=f"unknown assignment '{aid}'"
            )
        active = self.dispatcher.active(result.assignment_id)
        done = self.dispatcher.finished(result.assignment_id)
        current = active.attempt if active is not None else done.attempt if done is not None else 0
        if verdict is Verdict.SUPERSEDED:
            since = f"; the assignment has since finished ({done.ending.value})" if done is not None else ""
            return worker_pb2.FrameError(
                code=int(Code.FAILED_PRECONDITION),
                field=f"{at}.attempt",
                message=(
                    f"attempt {attempt} of assignment '{aid}' was superseded by attempt {current} "
                    f"(its lease ended and it was handed out again){since}; this result was ignored"
                ),
            )
        if verdict is Verdict.WRONG_ATTEMPT:
            return worker_pb2.FrameError(
                code=int(Code.INVALID_ARGUMENT),
                field=f"{at}.attempt",
                message=(
                    f"is {attempt}, but assignment '{aid}' was only handed out up to attempt {current}: "
                    "echo the attempt of the Assignment; this result was ignored"
                ),
            )
        if verdict is Verdict.FINISHED:
            ending = done.ending.value if done is not None else "it ended"
            return worker_pb2.FrameError(
                code=int(Code.FAILED_PRECONDITION),
                field=f"{at}.assignment_id",
                message=(
                    f"assignment '{aid}' attempt {attempt} has already finished ({ending}); "
                    "this result (a duplicate, or sent too late) was ignored"
                ),
            )
        return worker_pb2.FrameError(  # Verdict.NOT_HELD
            code=int(Code.FAILED_PRECONDITION),
            field=f"{at}.assignment_id",
            message=f"assignment '{aid}' attempt {attempt} is not held by this session; this result was ignored",
        )

    def frames(self, session: WorkerSession) -> list[ConnectResponse]:
        """What the session's outbox holds, as frames that each stay within
        max_message_bytes (a batch of many answers is split, never refused by
        gRPC as too large)."""
        assignments, cancels, replies = session.take_outbox()
        if not (assignments or cancels or replies):
            return []
        frame = ConnectResponse()
        for a in assignments:
            if a.session is session and a.state is not State.DONE:
                frame.assignments.append(_assignment(a))
        for assignment_id, reason in cancels:
            frame.cancels.add(assignment_id=assignment_id, reason=reason)
        for item in replies:
            if isinstance(item, worker_pb2.CallResult):
                frame.call_results.append(item)
            elif isinstance(item, worker_pb2.FrameError):
                frame.errors.append(item)
        budget = max(self.max_message_bytes - _FRAME_SLACK, self.max_message_bytes // 2)
        if frame.ByteSize() <= budget:
            return [frame]
        return _split(frame, budget)


def _split(frame: ConnectResponse, budget: int) -> list[ConnectResponse]:
    """`frame`'s entries, in order, over as many frames of at most `budget` bytes
    as they need (an entry larger than that gets a frame of its own)."""
    frames: list[ConnectResponse] = []
    current, size = ConnectResponse(), 0
    for name in ("assignments", "cancels", "call_results", "errors"):
        entries: Any = getattr(frame, name)
        for entry in entries:
            cost = entry.ByteSize() + _ENTRY_OVERHEAD
            if size and size + cost > budget:
                frames.append(current)
                current, size = ConnectResponse(), 0
            getattr(current, name).append(entry)
            size += cost
    if size:
        frames.append(current)
    return frames


def _assignment(a: Assignment) -> worker_pb2.Assignment:
    return worker_pb2.Assignment(
        assignment_id=a.assignment_id,
        attempt=a.attempt,
        run_id=a.run_id,
        thread_id=a.thread_id,
        spec=a.spec,
        task=a.task,
        deadline_unix_ms=a.deadline_ms,
        agent=a.agent,
        trace_context=a.trace_context or None,
    )
