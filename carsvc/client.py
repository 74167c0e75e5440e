"""Start, watch, inspect and cancel runs from Python.

    from carsvc.client import Client, agent, map_reduce

    async with Client("127.0.0.1:50051") as client:
        run = await client.run(
            map_reduce(agent("summarizer"), agent("combiner"), "Summarize", ["a", "b"])
        )
        print(run.result.map_reduce.reduced_answer)

The pattern builders (`agent`, `registered`, `single`, `map_reduce`) return
the generated protobuf messages, so anything the contract offers can also be
set on them directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from carsvc._proto.car.v1 import (
    patterns_pb2,
    registry_pb2,
    registry_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    types_pb2,
)
from carsvc.values import from_value, to_value

__all__ = ["Client", "agent", "map_reduce", "registered", "single"]

RunEvent = Any  # carsvc._proto.car.v1.events_pb2.RunEvent

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


def agent(
    name: str,
    system_prompt: str = "",
    *,
    tools: Iterable[str] = (),
    max_turns: int = 0,
    metadata: Mapping[str, Any] | None = None,
) -> patterns_pb2.AgentRef:
    """An inline agent spec."""
    spec = types_pb2.AgentSpec(name=name, system_prompt=system_prompt, tools=list(tools), max_turns=max_turns)
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
    msg = patterns_pb2.MapReduceRun(mapper=mapper, reducer=reducer, task=task, items=list(items))
    if max_concurrent is not None:
        msg.max_concurrent = max_concurrent
    return msg


class Client:
    """An asyncio client for the run, registry and state services."""

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.aio.Channel | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self._owns_channel = channel is None
        self.channel = channel or grpc.aio.insecure_channel(target, options=options or [])
        self.runs = runs_pb2_grpc.RunServiceStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.state = state_pb2_grpc.StateServiceStub(self.channel)

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- runs ---------------------------------------------------------------------------

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
    ) -> types_pb2.RunHandle:
        """Starts a run of `pattern` (a SingleRun, MapReduceRun, ... message)."""
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
        )
        getattr(request, field).CopyFrom(pattern)
        if budget is not None:
            request.budget.CopyFrom(budget)
        response: runs_pb2.StartRunResponse = await self.runs.StartRun(request)
        return response.run

    async def watch(self, run_id: str, after_seq: int = 0) -> AsyncIterator[RunEvent]:
        """A run's events from `after_seq` on, ending with its run_finished event."""
        async for batch in self.runs.WatchRun(runs_pb2.WatchRunRequest(run_id=run_id, after_seq=after_seq)):
            for event in batch.events:
                yield event

    async def wait(self, run_id: str) -> runs_pb2.Run:
        """Waits until the run has finished and returns it (with its result)."""
        async for _ in self.watch(run_id):
            pass
        return await self.get_run(run_id)

    async def run(self, pattern: Message, **options: Any) -> runs_pb2.Run:
        """Starts a run and waits for it to finish."""
        handle = await self.start_run(pattern, **options)
        return await self.wait(handle.run_id)

    async def get_run(self, run_id: str = "", *, thread_id: str = "") -> runs_pb2.Run:
        response: runs_pb2.GetRunResponse = await self.runs.GetRun(
            runs_pb2.GetRunRequest(run_id=run_id, thread_id=thread_id)
        )
        return response.run

    async def list_runs(
        self, *, thread_id: str = "", status: int = 0, agent_id: str = "", page_size: int = 0
    ) -> list[runs_pb2.Run]:
        """Every retained run matching the filters, newest first (follows pages)."""
        runs: list[runs_pb2.Run] = []
        token = ""
        while True:
            response: runs_pb2.ListRunsResponse = await self.runs.ListRuns(
                runs_pb2.ListRunsRequest(
                    thread_id=thread_id, status=status, agent_id=agent_id,  # type: ignore[arg-type]
                    page_size=page_size, page_token=token,
                )
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
        response: runs_pb2.CancelRunResponse = await self.runs.CancelRun(
            runs_pb2.CancelRunRequest(
                run_id=run_id, thread_id=thread_id, agent_id=agent_id, reason=reason, wait=wait
            )
        )
        return response

    # -- registry ---------------------------------------------------------------------

    async def register_agent(self, spec: types_pb2.AgentSpec, *, replace: bool = False) -> types_pb2.AgentSpec:
        response: registry_pb2.RegisterAgentResponse = await self.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(agent=spec, replace=replace)
        )
        return response.agent

    async def list_workers(self) -> list[registry_pb2.WorkerInfo]:
        response: registry_pb2.ListWorkersResponse = await self.registry.ListWorkers(
            registry_pb2.ListWorkersRequest()
        )
        return list(response.workers)

    # -- state ---------------------------------------------------------------------------

    async def get_state(self, scope: str, key: str, default: Any = None) -> Any:
        response: state_pb2.GetResponse = await self.state.Get(state_pb2.GetRequest(scope=scope, key=key))
        return from_value(response.value) if response.found else default

    async def set_state(self, scope: str, key: str, value: Any, *, writer: str = "") -> int:
        response: state_pb2.SetResponse = await self.state.Set(
            state_pb2.SetRequest(scope=scope, key=key, value=to_value(value), writer=writer)
        )
        return response.index
