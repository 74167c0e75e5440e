"""RunService.Submit: many runs over one long-lived stream, each answered once
when it has ended (or at once if it could not start)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from google.protobuf.message import DecodeError

from carsvc._proto.car.v1 import runs_pb2
from carsvc.domain.bounds import CLIENT_MESSAGE_BYTES
from carsvc.domain.errors import CarError, Code, InvalidArgument
from carsvc.domain.runs import RunRecord
from carsvc.services.errors import frame_error

Starter = Callable[[runs_pb2.StartRunRequest], Awaitable[RunRecord]]


def _refused(run_id: str, err: CarError) -> runs_pb2.SubmitAnswer:
    return runs_pb2.SubmitAnswer(run_id=run_id, error=frame_error(err, ""))




def _batches(answers: list[runs_pb2.SubmitAnswer]) -> list[list[runs_pb2.SubmitAnswer]]:
    batches: list[list[runs_pb2.SubmitAnswer]] = [[]]
    used = 0
    for answer in answers:
        cost = answer.ByteSize() + 8
        if batches[-1] and used + cost > CLIENT_MESSAGE_BYTES:
            batches.append([])
            used = 0
        batches[-1].append(answer)
        used += cost
    return batches


class SubmitStream:
    """One Submit stream: reads requests, starts their runs, and collects one
    answer per run; `responses()` sends what has collected in one message and
    ends after the client half-closed and every run it started has ended."""

    def __init__(self, start: Starter) -> None:
        self._start = start
        self._ready: list[runs_pb2.SubmitAnswer] = []
        self._wakeup = asyncio.Event()
        self._reading = True
        self._waiting: set[asyncio.Task[None]] = set()
        self.error: CarError | None = None

    def _add(self, answer: runs_pb2.SubmitAnswer) -> None:
        self._ready.append(answer)
        self._wakeup.set()

    async def _answer_when_ended(self, record: RunRecord) -> None:
        await record.done.wait()
        self._add(runs_pb2.SubmitAnswer(run_id=record.run_id, finished=record.finished_event()))

    async def _submit(self, request: runs_pb2.StartRunRequest) -> None:
        if not request.run_id:
            required = InvalidArgument("is required on a Submit stream (answers are matched by it)", field="run_id")
            self._add(_refused("", required))
            return
        try:
            record = await self._start(request)
        except CarError as err:
            self._add(_refused(request.run_id, err))
            return
        task = asyncio.get_running_loop().create_task(self._answer_when_ended(record))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def read(self, requests: AsyncIterator[runs_pb2.SubmitRequest]) -> None:
        try:
            async for message in requests:
                for request in message.starts:
                    await self._submit(request)
        except DecodeError as err:
            self.error = CarError(
                f"is not a valid {runs_pb2.SubmitRequest.DESCRIPTOR.full_name} ({err})",
                field="request",
                code=Code.INVALID_ARGUMENT,
            )
        # Half-closed (or refused): the stream ends once the runs it started have.
        while self._waiting:
            await asyncio.wait(set(self._waiting))
        self._reading = False
        self._wakeup.set()

    async def responses(
        self, requests: AsyncIterator[runs_pb2.SubmitRequest]
    ) -> AsyncIterator[runs_pb2.SubmitResponse]:
        reader = asyncio.get_running_loop().create_task(self.read(requests))
        try:
            while self._ready or self._reading:
                if not self._ready:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                ready, self._ready = self._ready, []
                for batch in _batches(ready):
                    yield runs_pb2.SubmitResponse(answers=batch)
        finally:
            reader.cancel()
            for task in list(self._waiting):
                task.cancel()
