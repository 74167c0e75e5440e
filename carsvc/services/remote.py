"""Runs another replica runs, as RunService and EventService answer for them:
records and events read from the shared store, cancels and decisions sent to
the replica that runs the run (which checks and applies them as for its own
clients)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from carsvc._proto.car.v1 import events_pb2, runs_pb2, types_pb2
from carsvc.domain.backend import RunDirectory
from carsvc.domain.errors import CarError, Code, NotFound, Unavailable
from carsvc.domain.runs import TERMINAL, check_owner
from carsvc.services.peers import PeerLinks

# Kinds of the questions a replica asks the one running a run.
CANCEL = "cancel-run"
DECIDE = "submit-decisions"
# How many stored runs one ListRuns (or a run-by-thread lookup) reads at most.
SCAN_BATCH = 500
MAX_SCANNED = 20_000


class RemoteRuns:
    def __init__(self, directory: RunDirectory, links: PeerLinks, max_inline_result_bytes: int) -> None:
        self.directory = directory
        self.links = links
        self.max_inline_result_bytes = max_inline_result_bytes

    def serve(
        self,
        cancel: Callable[[runs_pb2.CancelRunRequest], Awaitable[runs_pb2.CancelRunResponse]],
        decide: Callable[[runs_pb2.SubmitDecisionsRequest], Awaitable[runs_pb2.SubmitDecisionsResponse]],
    ) -> None:
        """Answers other replicas' cancels and decisions for this replica's runs."""

        async def on_cancel(data: bytes) -> bytes:
            return (await cancel(runs_pb2.CancelRunRequest.FromString(data))).SerializeToString()

        async def on_decide(data: bytes) -> bytes:
            return (await decide(runs_pb2.SubmitDecisionsRequest.FromString(data))).SerializeToString()

        self.links.serve(CANCEL, on_cancel)
        self.links.serve(DECIDE, on_decide)

    # -- reading -----------------------------------------------------------------------

    async def get(self, run_id: str, *, include_result: bool = True) -> runs_pb2.Run:
        run = await self.directory.record(run_id)
        if run is None:
            raise NotFound(f"no run '{run_id}' (unknown, or no longer retained)", field="run_id")
        if not include_result or run.result_omitted:
            run.ClearField("result")
        return run

    async def locate(self, run_id: str, thread_id: str) -> runs_pb2.Run:
        if run_id:
            return await self.get(run_id)
        holder = await self.directory.thread_run(thread_id)
        if holder:
            return await self.get(holder)
        async for _, run in self.newest(0, thread_id=thread_id):
            return run
        raise NotFound(f"no run on thread '{thread_id}'", field="thread_id")

    async def newest(
        self, before: int, *, thread_id: str = "", status: int = 0, agent_id: str = "", include_result: bool = False
    ) -> AsyncIterator[tuple[int, runs_pb2.Run]]:
        """Stored runs of every replica, newest first, filtered; `before` is an ordinal cursor."""
        scanned = 0
        while scanned < MAX_SCANNED:
            batch = await self.directory.newest(before, SCAN_BATCH)
            if not batch:
                return
            for ordinal, run in batch:
                before = ordinal
                if thread_id and run.thread_id != thread_id:
                    continue
                if status and run.status != status:
                    continue
                if agent_id and run.agent_id != agent_id:
                    continue
                if not include_result or run.result_omitted:
                    run.ClearField("result")
                yield ordinal, run
            scanned += len(batch)

    async def result(self, run_id: str) -> bytes:
        """The whole result, even one too large to send inline (ReadRunResult)."""
        run = await self.directory.record(run_id)
        if run is None:
            raise NotFound(f"no run '{run_id}' (unknown, or no longer retained)", field="run_id")
        if run.status not in TERMINAL:
            raise CarError(f"run '{run_id}' has not finished; it has no result yet", field="run_id")
        if not run.HasField("result"):
            raise CarError(f"run '{run_id}' ended without a result", field="run_id")
        return run.result.SerializeToString()

    async def events(self, run_id: str, after_seq: int, *, follow: bool) -> AsyncIterator[list[events_pb2.RunEvent]]:
        run = await self.get(run_id, include_result=False)
        if after_seq > run.last_seq:
            raise CarError(
                f"is beyond the run's last event (seq {run.last_seq})", field="after_seq", code=Code.OUT_OF_RANGE
            )
        async for batch in self.directory.events(run_id, after_seq, follow=follow):
            yield batch

    # -- control -------------------------------------------------------------------------

    async def cancel(self, run: runs_pb2.Run, request: runs_pb2.CancelRunRequest) -> runs_pb2.CancelRunResponse:
        check_owner(run.run_id, run.agent_id, request.agent_id)
        if run.status in TERMINAL:
            return runs_pb2.CancelRunResponse(run=_handle(run), already_finished=True)
        forwarded = runs_pb2.CancelRunRequest()
        forwarded.CopyFrom(request)
        forwarded.run_id, forwarded.thread_id = run.run_id, ""
        data = await self.links.ask(await self._owner(run), CANCEL, forwarded.SerializeToString())
        return runs_pb2.CancelRunResponse.FromString(data)

    async def decide(
        self, run: runs_pb2.Run, request: runs_pb2.SubmitDecisionsRequest
    ) -> runs_pb2.SubmitDecisionsResponse:
        check_owner(run.run_id, run.agent_id, request.agent_id)
        forwarded = runs_pb2.SubmitDecisionsRequest()
        forwarded.CopyFrom(request)
        forwarded.run_id, forwarded.thread_id = run.run_id, ""
        data = await self.links.ask(await self._owner(run), DECIDE, forwarded.SerializeToString())
        return runs_pb2.SubmitDecisionsResponse.FromString(data)

    def cancel_elsewhere(self, run_id: str, reason: str) -> None:
        """An interrupting run's cancel of another replica's run (not awaited)."""
        request = runs_pb2.CancelRunRequest(run_id=run_id, reason=reason)

        async def send() -> None:
            run = await self.directory.record(run_id)
            if run is not None and run.status not in TERMINAL:
                request.agent_id = run.agent_id
                await self.links.ask(await self._owner(run), CANCEL, request.SerializeToString())

        self.links.spawn(send())

    async def _owner(self, run: runs_pb2.Run) -> str:
        owner = await self.directory.owner(run.run_id)
        if not owner:
            raise Unavailable(f"run '{run.run_id}' is being taken over by another replica; retry in a moment")
        if owner == self.directory.replica_id:
            raise Unavailable(f"run '{run.run_id}' is being resumed on this replica; retry in a moment")
        return owner


def _handle(run: runs_pb2.Run) -> types_pb2.RunHandle:
    return types_pb2.RunHandle(run_id=run.run_id, thread_id=run.thread_id, agent_id=run.agent_id, status=run.status)

