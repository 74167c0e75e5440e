"""RunService and EventService: start, watch, inspect and cancel runs."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from carsvc._proto.car.v1 import (
    events_pb2,
    events_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    types_pb2,
)
from carsvc.domain.bounds import CLIENT_MESSAGE_BYTES, check_id, check_value
from carsvc.domain.convert import limits_from_proto
from carsvc.domain.errors import CarError, Code, InvalidArgument, NotFound, Unavailable
from carsvc.domain.eventlog import DEFAULT_WATCHER_MAX_BYTES
from carsvc.domain.registry import AgentRegistry
from carsvc.domain.runs import ON_BUSY_REJECT, RunManager, RunRecord
from carsvc.domain.runtime import Pattern
from carsvc.domain.specs import AgentResolver, Limits
from carsvc.patterns import BUILDERS
from carsvc.services.errors import abort, frame_error, shown, streaming, unary
from carsvc.services.remote import RemoteRuns
from carsvc.services.submit import SubmitStream
from carsvc.services.watchers import MESSAGE_BYTES, event_batches, events_behind, kinds_filter, messages, wrapped

log = logging.getLogger("carsvc.runs")

# SessionResponse.events (field 2, length-delimited).
_SESSION_EVENTS_TAG = b"\x12"
# Answers to a session's requests waiting to be sent before it reads more requests.
_MAX_REPLIES = 256


class _Replies:
    """A session's answers to its client's requests, sent before its events."""

    def __init__(self, wakeup: asyncio.Event) -> None:
        self._items: deque[runs_pb2.SessionResponse | None] = deque()
        self._wakeup = wakeup  # the session's writer waits on it
        self.room = asyncio.Event()
        self.room.set()

    def __bool__(self) -> bool:
        return bool(self._items)

    def put_nowait(self, reply: runs_pb2.SessionResponse | None) -> None:
        """None: stop (the client sent something undecodable)."""
        self._items.append(reply)
        self._wakeup.set()
        if len(self._items) >= _MAX_REPLIES:
            self.room.clear()

    def pop(self) -> runs_pb2.SessionResponse | None:
        reply = self._items.popleft()
        if len(self._items) < _MAX_REPLIES:
            self.room.set()
        return reply

MAX_LABELS = 64
MAX_LABEL_KEY_BYTES = 256
MAX_LABEL_VALUE_BYTES = 4096
MAX_REASON_BYTES = 4096
# ReadRunResult's piece size.
RESULT_CHUNK_BYTES = 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_ON_BUSY = frozenset(runs_pb2.OnBusy.values())
# A page token is a run ordinal: at most 19 ASCII digits (an int64).
_MAX_TOKEN_DIGITS = 19


def _check_labels(labels: Mapping[str, str]) -> None:
    """Labels travel with every Run: a few short strings, like Kubernetes labels."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"has {len(labels)} labels; the limit is {MAX_LABELS}", field="labels")
    for key, value in labels.items():
        for what, text, limit in (("key", key, MAX_LABEL_KEY_BYTES), ("value", value, MAX_LABEL_VALUE_BYTES)):
            if (size := len(text.encode())) > limit:
                raise InvalidArgument(
                    f"the {what} of label '{shown(key, 64)}' is {size} bytes; the limit is {limit}", field="labels"
                )


def _check_decision(decision: types_pb2.ToolCallDecision, field: str, max_depth: int) -> None:
    check_id(decision.target_id, f"{field}.target_id")
    check_id(decision.decision_id, f"{field}.decision_id")
    if len(decision.reason.encode()) > MAX_REASON_BYTES:
        raise InvalidArgument(f"is over {MAX_REASON_BYTES} bytes", field=f"{field}.reason")
    if decision.HasField("result"):
        check_value(decision.result, f"{field}.result", max_depth)


EVENT_KINDS = frozenset(f.name for f in events_pb2.RunEvent.DESCRIPTOR.oneofs_by_name["kind"].fields)


def check_kinds(kinds: Sequence[str]) -> None:
    """ReadEvents' kind filter names only kinds of RunEvent."""
    for i, kind in enumerate(kinds):
        if kind not in EVENT_KINDS:
            raise InvalidArgument(f"unknown event kind '{kind}'", field=f"kinds[{i}]")


def _undecodable(err: DecodeError) -> CarError:
    return InvalidArgument(
        f"is not a valid {runs_pb2.SessionRequest.DESCRIPTOR.full_name} ({err})", field="request"
    )


class RunService(runs_pb2_grpc.RunServiceServicer):
    def __init__(
        self,
        runs: RunManager,
        registry: AgentRegistry,
        limits: Limits,
        watcher_buffer: int,
        watcher_max_bytes: int = DEFAULT_WATCHER_MAX_BYTES,
    ) -> None:
        self.runs = runs
        self.registry = registry
        self.limits = limits
        # Turns each AgentRef of a run request into its spec (inline or registered).
        self.resolve_agent = AgentResolver(registry, limits)
        # How far a watcher may fall behind, in events and in bytes (docs/runs.md).
        self.watcher_buffer = watcher_buffer
        self.watcher_max_bytes = watcher_max_bytes
        # Runs other replicas run (with a shared backend; services/remote.py).
        self.remote: RemoteRuns | None = None

    def join(self, remote: RemoteRuns) -> None:
        """Answers for every replica's runs, and lets the others cancel and decide for ours."""
        self.remote = remote
        self.runs.cancel_elsewhere = remote.cancel_elsewhere
        remote.serve(self._cancel_here, self._decide_here)

    def pattern_of(self, request: runs_pb2.StartRunRequest) -> Pattern:
        """The pattern a StartRunRequest asks for, checked (also how a journaled
        request is rebuilt when its run resumes after a restart)."""
        which = request.WhichOneof("pattern")
        if which is None:
            raise InvalidArgument(
                "exactly one pattern must be set (" + ", ".join(sorted(BUILDERS)) + ")",
                field="pattern",
            )
        build = BUILDERS.get(which)
        if build is None:
            raise CarError(f"the '{which}' pattern is not available yet", field="pattern", code=Code.UNIMPLEMENTED)
        return build(getattr(request, which), self.resolve_agent, self.limits)

    async def start(self, request: runs_pb2.StartRunRequest) -> RunRecord:
        """Checks a StartRunRequest and starts (or queues) its run."""
        for name in ("thread_id", "agent_id", "run_id", "budget_id", "state_scope"):
            check_id(getattr(request, name), name)
        if request.on_busy not in _ON_BUSY:
            raise InvalidArgument(
                f"unknown value {request.on_busy} (REJECT, INTERRUPT or ENQUEUE)", field="on_busy"
            )
        _check_labels(request.labels)
        for i, decision in enumerate(request.initial_decisions):
            _check_decision(decision, f"initial_decisions[{i}]", self.limits.max_value_depth)
        pattern = self.pattern_of(request)
        limits = limits_from_proto(request.budget) if request.HasField("budget") else None
        return await self.runs.start(
            pattern,
            thread_id=request.thread_id,
            agent_id=request.agent_id,
            run_id=request.run_id,
            on_busy=request.on_busy or ON_BUSY_REJECT,
            limits=limits,
            budget_id=request.budget_id,
            state_scope=request.state_scope,
            labels=dict(request.labels),
            timeout=request.timeout_ms / 1000 if request.timeout_ms else None,
            initial_decisions=list(request.initial_decisions),
            request=request,
        )

    # The unary RPCs, without gRPC: each raises CarError, which the handler
    # below it (and the HTTP API, carsvc/http/) turns into its status.

    async def start_run(self, request: runs_pb2.StartRunRequest) -> runs_pb2.StartRunResponse:
        record = await self.start(request)
        await self.runs.acknowledged()  # strict journal: the run's record is on disk
        return runs_pb2.StartRunResponse(run=record.handle())

    async def get_run(self, request: runs_pb2.GetRunRequest) -> runs_pb2.GetRunResponse:
        try:
            record = self.runs.locate(request.run_id, request.thread_id)
        except NotFound:
            if self.remote is None:
                raise
            return runs_pb2.GetRunResponse(run=await self.remote.locate(request.run_id, request.thread_id))
        return runs_pb2.GetRunResponse(run=record.to_proto())

    async def list_runs(self, request: runs_pb2.ListRunsRequest, *, pattern: str = "") -> runs_pb2.ListRunsResponse:
        """A page of runs, newest first; `pattern` (the HTTP API's filter) keeps
        only runs of that pattern."""
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"must be at most {MAX_PAGE_SIZE}", field="page_size")
        size = request.page_size or DEFAULT_PAGE_SIZE
        before = 0
        if request.page_token:
            token = request.page_token
            if not (token.isascii() and token.isdigit() and len(token) <= _MAX_TOKEN_DIGITS):
                raise InvalidArgument("is not a token from a previous ListRuns", field="page_token")
            before = int(token)
        response = runs_pb2.ListRunsResponse()
        last = 0
        used = 0
        async for ordinal, run in self._listed(request, before):
            if pattern and run.pattern != pattern:
                continue
            cost = run.ByteSize() + 8
            # A page ends at page_size runs, or before it would outgrow what a
            # client with default settings can receive (at least one run per page).
            if len(response.runs) == size or (response.runs and used + cost > CLIENT_MESSAGE_BYTES):
                response.next_page_token = str(last) if last else ""
                break
            response.runs.append(run)
            used += cost
            last = ordinal
        return response

    async def cancel_run(self, request: runs_pb2.CancelRunRequest) -> runs_pb2.CancelRunResponse:
        try:
            record = self.runs.locate(request.run_id, request.thread_id)
        except NotFound:
            if self.remote is None:
                raise
            return await self.remote.cancel(await self.remote.locate(request.run_id, request.thread_id), request)
        return await self._cancel(record, request)

    async def submit_decisions(self, request: runs_pb2.SubmitDecisionsRequest) -> runs_pb2.SubmitDecisionsResponse:
        try:
            record = self.runs.locate(request.run_id, request.thread_id)
        except NotFound:
            if self.remote is None:
                raise
            return await self.remote.decide(await self.remote.locate(request.run_id, request.thread_id), request)
        return self._decide(record, request)

    @unary
    async def StartRun(
        self, request: runs_pb2.StartRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> runs_pb2.StartRunResponse:
        return await self.start_run(request)

    @streaming
    async def WatchRun(  # type: ignore[override]
        self, request: runs_pb2.WatchRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Serialized WatchRunResponses (registered with a pass-through serializer)."""
        if self.remote is not None and request.run_id not in self.runs.runs:
            async for read in self.remote.events(request.run_id, request.after_seq, follow=True):
                for data in messages(read, runs_pb2.WatchRunResponse):
                    yield data
            return
        record = self.runs.get(request.run_id)
        subscription = self.runs.watch(
            record, request.after_seq, self.watcher_buffer, max_bytes=self.watcher_max_bytes
        )
        async for batch in event_batches(context, subscription, record.run_id):
            yield batch

    @unary
    async def GetRun(
        self, request: runs_pb2.GetRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> runs_pb2.GetRunResponse:
        return await self.get_run(request)

    @unary
    async def ListRuns(
        self, request: runs_pb2.ListRunsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> runs_pb2.ListRunsResponse:
        return await self.list_runs(request)

    async def _listed(self, request: runs_pb2.ListRunsRequest, before: int) -> AsyncIterator[tuple[int, runs_pb2.Run]]:
        """Runs newest first: this replica's, or with other replicas every stored
        run (this replica's own as it sees them now)."""
        thread_id, status, agent_id = request.thread_id, request.status, request.agent_id
        if self.remote is None:
            for record in self.runs.select(thread_id=thread_id, status=status, agent_id=agent_id, before=before):
                yield record.ordinal, record.to_proto(include_result=request.include_results)
            return
        async for ordinal, run in self.remote.newest(
            before, thread_id=thread_id, status=status, agent_id=agent_id, include_result=request.include_results
        ):
            here = self.runs.runs.get(run.run_id)
            yield ordinal, here.to_proto(include_result=request.include_results) if here is not None else run

    @streaming
    async def ReadRunResult(
        self, request: runs_pb2.ReadRunResultRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[runs_pb2.ReadRunResultResponse]:
        if self.remote is not None and request.run_id not in self.runs.runs:
            data = await self.remote.result(request.run_id)
        else:
            data = self.runs.get(request.run_id).serialized_result()
        total = len(data)
        if request.offset > total:
            raise CarError(
                f"is beyond the end of the {total}-byte result", field="offset", code=Code.OUT_OF_RANGE
            )
        offset = request.offset
        while True:
            chunk = data[offset : offset + RESULT_CHUNK_BYTES]
            yield runs_pb2.ReadRunResultResponse(chunk=chunk, offset=offset, total_bytes=total)
            offset += len(chunk)
            if offset >= total:
                return

    @unary
    async def CancelRun(
        self, request: runs_pb2.CancelRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> runs_pb2.CancelRunResponse:
        return await self.cancel_run(request)

    async def _cancel(self, record: RunRecord, request: runs_pb2.CancelRunRequest) -> runs_pb2.CancelRunResponse:
        record.check_owner(request.agent_id)
        cancelled = await self.runs.cancel(record, request.reason, wait=request.wait)
        return runs_pb2.CancelRunResponse(run=record.handle(), already_finished=not cancelled)

    async def _cancel_here(self, request: runs_pb2.CancelRunRequest) -> runs_pb2.CancelRunResponse:
        """Another replica's client cancels a run of this replica's."""
        return await self._cancel(self._here(request.run_id), request)

    async def _decide_here(self, request: runs_pb2.SubmitDecisionsRequest) -> runs_pb2.SubmitDecisionsResponse:
        return self._decide(self._here(request.run_id), request)

    def _here(self, run_id: str) -> RunRecord:
        record = self.runs.runs.get(run_id)
        if record is None:
            raise Unavailable(f"run '{run_id}' has moved to another replica; retry")
        return record

    def _decide(self, record: RunRecord, request: runs_pb2.SubmitDecisionsRequest) -> runs_pb2.SubmitDecisionsResponse:
        record.check_owner(request.agent_id)
        for i, decision in enumerate(request.decisions):
            _check_decision(decision, f"decisions[{i}]", self.limits.max_value_depth)
        outcome = self.runs.submit_decisions(record, list(request.decisions))
        return runs_pb2.SubmitDecisionsResponse(
            run=record.handle(),
            applied_decision_ids=outcome.applied,
            queued_decision_ids=outcome.queued,
            duplicate_decision_ids=outcome.duplicates,
        )

    @unary
    async def SubmitDecisions(
        self, request: runs_pb2.SubmitDecisionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> runs_pb2.SubmitDecisionsResponse:
        return await self.submit_decisions(request)

    async def Session(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[runs_pb2.SessionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[runs_pb2.SessionResponse | bytes]:
        """SessionResponses, events among them as serialized bytes (registered
        with a pass-through serializer)."""
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        except DecodeError as err:
            await abort(context, _undecodable(err))
        if first.WhichOneof("action") != "start":
            await abort(context, InvalidArgument("the first message must be start", field="action"))
        try:
            record = await self.start(first.start)
        except CarError as err:
            await abort(context, err)
        await self.runs.acknowledged()  # strict journal: the run's record is on disk
        try:
            subscription = self.runs.watch(record, 0, self.watcher_buffer, max_bytes=self.watcher_max_bytes)
        except CarError as err:
            await abort(context, err)
        yield runs_pb2.SessionResponse(started=record.handle())  # initial metadata is sent with it
        ending = events_behind(subscription, context, record.run_id)
        replies = _Replies(subscription.wakeup)
        idle = asyncio.Event()  # set while no client request is being handled
        idle.set()
        reader = asyncio.get_running_loop().create_task(self._session_requests(record, requests, replies, idle))
        try:
            while True:
                if replies:
                    if (reply := replies.pop()) is None:
                        break  # the client sent something undecodable
                    yield reply
                    continue
                chunk = subscription.take(MESSAGE_BYTES)
                if chunk is not None:
                    if chunk:
                        yield wrapped(chunk, _SESSION_EVENTS_TAG)  # a SessionResponse{events}
                    subscription.ack()
                    continue
                if subscription.overflowed:
                    return  # ended RESOURCE_EXHAUSTED (events_behind)
                if subscription.done:
                    break
                await subscription.wait()
            # The run is over; answer what the client asked before closing.
            await idle.wait()
            while replies:
                if (reply := replies.pop()) is not None:
                    yield reply
        finally:
            ending.settle()
            reader.cancel()
            subscription.close()
        if reader.done() and not reader.cancelled():
            if (failure := reader.exception()) is not None:
                log.warning("run %s: a session's request reader failed: %r", record.run_id, failure)
            elif (error := reader.result()) is not None:
                await abort(context, error)

    async def _session_requests(
        self,
        record: RunRecord,
        requests: AsyncIterator[runs_pb2.SessionRequest],
        replies: _Replies,
        idle: asyncio.Event,
    ) -> CarError | None:
        """Answers the client's requests; a request that is not a SessionRequest
        ends the stream (the run goes on) with the error returned. While
        _MAX_REPLIES answers wait to be sent, it reads nothing more (the
        client's writes wait instead)."""
        try:
            async for message in requests:
                await self._session_request(record, message, replies, idle)
                await replies.room.wait()
        except DecodeError as err:
            replies.put_nowait(None)
            return _undecodable(err)
        return None

    async def _session_request(
        self,
        record: RunRecord,
        message: runs_pb2.SessionRequest,
        replies: _Replies,
        idle: asyncio.Event,
    ) -> None:
        idle.clear()
        action = message.WhichOneof("action")
        try:
            if action == "decisions":
                decisions = message.decisions
                if not decisions.agent_id:
                    decisions.agent_id = record.agent_id
                replies.put_nowait(runs_pb2.SessionResponse(decisions=self._decide(record, decisions)))
            elif action == "cancel":
                cancel = message.cancel
                record.check_owner(cancel.agent_id or record.agent_id)
                cancelled = await self.runs.cancel(record, cancel.reason, wait=cancel.wait)
                replies.put_nowait(
                    runs_pb2.SessionResponse(
                        cancelled=runs_pb2.CancelRunResponse(run=record.handle(), already_finished=not cancelled)
                    )
                )
            elif action == "start":
                raise InvalidArgument("a session runs one run; start another session", field="start")
            else:
                raise InvalidArgument("must set decisions or cancel", field="action")
        except CarError as err:
            replies.put_nowait(runs_pb2.SessionResponse(error=frame_error(err, action or "action")))
        finally:
            idle.set()

    async def Submit(
        self,
        request_iterator: AsyncIterator[runs_pb2.SubmitRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[runs_pb2.SubmitResponse]:
        stream = SubmitStream(self.start)
        async for response in stream.responses(request_iterator):
            yield response
        if stream.error is not None:
            await abort(context, stream.error)


class EventService(events_pb2_grpc.EventServiceServicer):
    def __init__(
        self, runs: RunManager, watcher_buffer: int, watcher_max_bytes: int = DEFAULT_WATCHER_MAX_BYTES
    ) -> None:
        self.runs = runs
        self.watcher_buffer = watcher_buffer
        self.watcher_max_bytes = watcher_max_bytes
        self.remote: RemoteRuns | None = None  # set as RunService.join sets its own

    @streaming
    async def ReadEvents(  # type: ignore[override]
        self, request: events_pb2.ReadEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Serialized ReadEventsResponses (registered with a pass-through serializer)."""
        check_kinds(request.kinds)
        if self.remote is not None and request.run_id not in self.runs.runs:
            kinds = frozenset(request.kinds)
            async for read in self.remote.events(request.run_id, request.after_seq, follow=request.follow):
                kept = [e for e in read if not kinds or e.WhichOneof("kind") in kinds]
                for data in messages(kept, events_pb2.ReadEventsResponse):
                    yield data
            return
        record = self.runs.get(request.run_id)
        subscription = self.runs.watch(
            record,
            request.after_seq,
            self.watcher_buffer,
            max_bytes=self.watcher_max_bytes,
            follow=request.follow,
        )
        if request.kinds:
            subscription.keep_only(kinds_filter(frozenset(request.kinds)))
        async for batch in event_batches(context, subscription, record.run_id):
            yield batch
