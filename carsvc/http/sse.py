"""A run's events as Server-Sent Events: GET /api/v1/runs/{run_id}/events.

Each event is one SSE message whose `id` is its seq and whose `data` is the
RunEvent as JSON, so a client that reconnects with `Last-Event-ID` (as
EventSource does by itself) resumes after the last event it received, with no
gap and no duplicate: WatchRun's `after_seq`.

* The stream replays the retained events after the seq, then follows live ones
  (unless `follow=false`), and ends after `run_finished`. Nothing to send ever
  again (a finished run read to its end) is `204 No Content`, which tells an
  EventSource to stop reconnecting.
* What WatchRun refuses before its first message (no such run, an `after_seq`
  past the end or no longer retained, too many watchers) is an HTTP error with
  the JSON body of every other endpoint.
* A watcher that falls behind (watcher_buffer, watcher_max_bytes) gets the
  events up to the seq it is told, then one `event: error` message (the JSON
  error body plus `resume_after_seq`), and the stream ends; reconnecting with
  that seq as `Last-Event-ID` gets the rest.
* An idle stream carries a comment line every KEEPALIVE_S seconds, so proxies
  keep it open and a closed client is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from carsvc._proto.car.v1 import events_pb2
from carsvc.domain.errors import CarError, Code
from carsvc.domain.eventlog import Subscription
from carsvc.domain.runs import TERMINAL
from carsvc.http.errors import error_body
from carsvc.http.jsonio import dumps, to_json
from carsvc.services.runs import RunService
from carsvc.services.watchers import MESSAGE_BYTES, kinds_filter

__all__ = ["KEEPALIVE_S", "EventStream", "sse_message"]

KEEPALIVE_S = 15.0
# How long an EventSource waits before it reconnects.
RETRY_MS = 1000


def sse_message(event: events_pb2.RunEvent) -> str:
    return f"id: {event.seq}\ndata: {to_json(event)}\n\n"


def _error_message(code: str, message: str, resume_after_seq: int) -> bytes:
    body = {**error_body(code, message), "resume_after_seq": resume_after_seq}
    return f"event: error\ndata: {dumps(body)}\n\n".encode()


class EventStream:
    """The SSE endpoint's streams, local runs from their event logs, other
    replicas' runs from the shared store (as WatchRun reads them)."""

    def __init__(self, runs: RunService, keepalive: float = KEEPALIVE_S) -> None:
        self.service = runs
        self.keepalive = keepalive

    async def stream(
        self, request: web.Request, run_id: str, after_seq: int, kinds: frozenset[str], follow: bool
    ) -> web.StreamResponse:
        service = self.service
        if service.remote is not None and run_id not in service.runs.runs:
            return await self._remote(request, run_id, after_seq, kinds, follow)
        record = service.runs.get(run_id)
        sub = service.runs.watch(
            record, after_seq, service.watcher_buffer, max_bytes=service.watcher_max_bytes, follow=follow
        )
        try:
            if sub.done:
                return web.Response(status=204)
            if kinds:
                sub.keep_only(kinds_filter(kinds))
            response = await self._open(request)
            with contextlib.suppress(ConnectionResetError):  # the client went away
                await self._follow(request, response, sub, run_id)
            return response
        finally:
            sub.close()

    async def _open(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass each message on at once
            }
        )
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        return response

    async def _follow(self, request: web.Request, response: web.StreamResponse, sub: Subscription, run_id: str) -> None:
        while True:
            chunk = sub.take(MESSAGE_BYTES)
            if chunk is None:
                if sub.overflowed:
                    message = f"watcher fell behind run '{run_id}': {sub.why}; resume with after_seq={sub.sent_seq}"
                    await response.write(_error_message(Code.RESOURCE_EXHAUSTED.name, message, sub.sent_seq))
                    return
                if sub.done:
                    return
                try:
                    async with asyncio.timeout(self.keepalive):
                        await sub.wait()
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                continue
            if chunk:
                events = events_pb2.ReadEventsResponse.FromString(chunk).events
                await response.write("".join(sse_message(e) for e in events).encode())
            sub.ack()

    async def _remote(
        self, request: web.Request, run_id: str, after_seq: int, kinds: frozenset[str], follow: bool
    ) -> web.StreamResponse:
        """Another replica's run, read from the shared store."""
        remote = self.service.remote
        assert remote is not None
        run = await remote.get(run_id, include_result=False)  # NOT_FOUND as GetRun
        if after_seq > run.last_seq:  # as RemoteRuns.events refuses it, before the stream opens
            raise CarError(
                f"is beyond the run's last event (seq {run.last_seq})", field="after_seq", code=Code.OUT_OF_RANGE
            )
        if run.status in TERMINAL and after_seq == run.last_seq:
            return web.Response(status=204)
        response = await self._open(request)
        batches = remote.events(run_id, after_seq, follow=follow)
        sent = [after_seq]
        with contextlib.suppress(ConnectionResetError):
            try:
                await self._relay(response, batches, kinds, sent)
            except CarError as err:  # the run went while it was read
                await response.write(_error_message(err.code.name, str(err), sent[0]))
        return response

    async def _relay(
        self,
        response: web.StreamResponse,
        batches: AsyncIterator[list[events_pb2.RunEvent]],
        kinds: frozenset[str],
        sent: list[int],
    ) -> None:
        """Writes the batches as they come; sent[0] is the last seq written."""
        pending = asyncio.ensure_future(anext(batches))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self.keepalive)
                if not done:
                    await response.write(b": keepalive\n\n")
                    continue
                try:
                    batch = pending.result()
                except StopAsyncIteration:
                    return
                pending = asyncio.ensure_future(anext(batches))
                text = "".join(sse_message(e) for e in batch if not kinds or e.WhichOneof("kind") in kinds)
                if text:
                    await response.write(text.encode())
                if batch:
                    sent[0] = batch[-1].seq
        finally:
            pending.cancel()  # ends the generator too
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: StopAsyncIteration, or what ended the read
