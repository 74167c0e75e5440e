"""Map-reduce: one mapper per item with bounded concurrency, then a reducer.

Follows car-multi's map_reduce.rs: mapper `i` is `{mapper}_{i}` on
MAP_ITEM_TASK; outputs keep their item's index whatever happens to them; the
budget gates every mapper just before it starts (a refused one becomes a
skipped output at its index) and the reducer (refused: the mapper summaries
joined by newlines)."""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import BUDGET_SKIPPED_PREFIX, RunInfra, succeeded
from carsvc.patterns.base import (
    Limits,
    PatternOutcome,
    Resolver,
    check_count,
    check_text,
    require_ref,
)
from carsvc.patterns.prompts import MAP_ITEM_TASK, MAP_SUMMARY_CHARS, MAP_SUMMARY_LINE, REDUCE_TASK

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
DEFAULT_MAX_CONCURRENT = 5
log = logging.getLogger("carsvc.patterns")


class MapReduce:
    name: ClassVar[str] = "map_reduce"

    def __init__(
        self,
        mapper: AgentSpec,
        reducer: AgentSpec,
        task: str,
        items: list[str],
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    ) -> None:
        self.mapper = mapper
        self.reducer = reducer
        self.task = task
        self.items = items
        self.max_concurrent = max_concurrent

    @classmethod
    def build(cls, msg: patterns_pb2.MapReduceRun, resolve: Resolver, limits: Limits) -> MapReduce:
        mapper = resolve(require_ref(msg, "mapper", "map_reduce"), "map_reduce.mapper")
        reducer = resolve(require_ref(msg, "reducer", "map_reduce"), "map_reduce.reducer")
        check_text(msg.task, "map_reduce.task", limits)
        if not msg.items:
            raise InvalidArgument("must hold at least one item", field="map_reduce.items")
        check_count(len(msg.items), "map_reduce.items", limits.max_items, "items")
        for i, item in enumerate(msg.items):
            check_text(item, f"map_reduce.items[{i}]", limits)
        max_concurrent = DEFAULT_MAX_CONCURRENT
        if msg.HasField("max_concurrent"):
            if msg.max_concurrent == 0:
                raise InvalidArgument(
                    "must be at least 1 (leave it unset for the default, 5)",
                    field="map_reduce.max_concurrent",
                )
            max_concurrent = msg.max_concurrent
        return cls(mapper, reducer, msg.task, list(msg.items), max_concurrent)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        outputs: list[AgentOutput | None] = [None] * len(self.items)
        indices = iter(range(len(self.items)))

        async def lane() -> None:
            # Lanes pull the next index from one shared iterator, so mappers
            # start in item order and at most `max_concurrent` run at once.
            for i in indices:
                outputs[i] = await self._map_one(infra, i)

        async with asyncio.TaskGroup() as lanes:
            for _ in range(min(self.max_concurrent, len(self.items))):
                lanes.create_task(lane())
        map_outputs = [o for o in outputs if o is not None]

        summaries = "\n".join(
            MAP_SUMMARY_LINE.format(name=o.name, answer=o.answer[:MAP_SUMMARY_CHARS])
            for o in map_outputs
            if succeeded(o)
        )
        reducer_output = infra.admit(self.reducer.name, role="reducer")
        reducer_ran = reducer_output is None
        if reducer_output is None:
            reduce_task = REDUCE_TASK.format(task=self.task, count=len(map_outputs), summaries=summaries)
            reducer_output = await infra.run_agent(self.reducer, reduce_task, role="reducer")
            reduced = reducer_output.answer if succeeded(reducer_output) else ""
        else:
            reduced = summaries
        result = patterns_pb2.MapReduceResult(
            task=self.task,
            map_outputs=map_outputs,
            reduced_answer=reduced,
            all_succeeded=all(succeeded(o) for o in map_outputs),
            reducer_output=reducer_output,
        )
        outcome = PatternOutcome(patterns_pb2.RunResult(map_reduce=result))
        if not reducer_ran and all(o.error.startswith(BUDGET_SKIPPED_PREFIX) for o in map_outputs):
            outcome.failed = True
            outcome.reason = "budget_exhausted"
            outcome.detail = f"the budget refused every mapper and the reducer: {reducer_output.error}"
        elif reducer_ran and not succeeded(reducer_output):
            outcome.failed = True
            outcome.reason = "agent_failed"
            outcome.detail = (
                f"reducer '{self.reducer.name}' failed: "
                + (reducer_output.error if reducer_output.HasField("error") else "empty answer")
            )
        return outcome

    async def _map_one(self, infra: RunInfra, i: int) -> AgentOutput:
        name = f"{self.mapper.name}_{i}"
        skipped = infra.admit(name, role="mapper", index=i)
        if skipped is not None:
            return skipped
        spec = AgentSpec()
        spec.CopyFrom(self.mapper)
        spec.name = name
        task = MAP_ITEM_TASK.format(task=self.task, item=self.items[i])
        try:
            return await infra.run_agent(spec, task, role="mapper", index=i, agent=self.mapper.name)
        except Exception as exc:  # a bug must not shift the other items' indices
            log.exception("mapper %s of run %s failed inside the sidecar", name, infra.run_id)
            return AgentOutput(name=name, error=f"internal error: {exc}")
