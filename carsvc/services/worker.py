"""WorkerService: the worker protocol's stream, adapted onto the Dispatcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from carsvc._proto.car.v1 import worker_pb2, worker_pb2_grpc
from carsvc.domain.errors import CarError, Code
from carsvc.domain.workers import Assignment, Dispatcher, State, Verdict, WorkerSession
from carsvc.services.calls import CallHandler
from carsvc.services.errors import abort

log = logging.getLogger("carsvc.workers")

ConnectRequest = worker_pb2.ConnectRequest
ConnectResponse = worker_pb2.ConnectResponse


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        dispatcher: Dispatcher,
        calls: CallHandler,
        *,
        heartbeat_interval_ms: int,
        max_message_bytes: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.calls = calls
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.max_message_bytes = max_message_bytes

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
                max_in_flight=session.max_in_flight,
                max_message_bytes=self.max_message_bytes,
            )
        )
        self._handle(session, first, first_frame=True)
        reader = asyncio.get_running_loop().create_task(self._read(session, frames))
        drain_sent = False
        try:
            while True:
                await session.wakeup.wait()
                session.wakeup.clear()
                frame = self._frame(session)
                if session.drain_notice is not None and not drain_sent:
                    drain_sent = True
                    reason, grace_ms = session.drain_notice
                    frame = frame or ConnectResponse()
                    frame.drain.reason = reason
                    frame.drain.grace_ms = grace_ms
                if frame is not None:
                    yield frame
                if session.closed:
                    break
        finally:
            reader.cancel()
            self.calls.session_closed(session)
            self.dispatcher.close_session(session, "the stream ended")
        if session.close_reason.startswith("no frame"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session closed: {session.close_reason}")

    async def _read(self, session: WorkerSession, frames: AsyncIterator[ConnectRequest]) -> None:
        reason = "the worker closed its stream"
        try:
            async for frame in frames:
                session.touch()
                self._handle(session, frame)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the stream broke (worker died, network)
            reason = f"the stream broke: {err!r}"
        self.dispatcher.close_session(session, reason)

    def _handle(self, session: WorkerSession, frame: ConnectRequest, *, first_frame: bool = False) -> None:
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
        if result.attempt == 0:
            session.reply(
                worker_pb2.FrameError(
                    code=int(Code.INVALID_ARGUMENT),
                    field=f"results[{i}].attempt",
                    message="must echo the assignment's attempt (1 or more)",
                )
            )
            return
        verdict = self.dispatcher.complete(session, result.assignment_id, result.attempt, result.output)
        if verdict is Verdict.UNKNOWN:
            session.reply(
                worker_pb2.FrameError(
                    code=int(Code.NOT_FOUND),
                    field=f"results[{i}].assignment_id",
                    message=f"unknown assignment '{result.assignment_id}'",
                )
            )
        elif verdict is Verdict.SUPERSEDED:
            log.debug(
                "ignored a late result for %s attempt %d from %s",
                result.assignment_id, result.attempt, session.worker_id,
            )

    def _frame(self, session: WorkerSession) -> ConnectResponse | None:
        assignments, cancels, replies = session.take_outbox()
        if not (assignments or cancels or replies):
            return None
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
        return frame


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
    )
