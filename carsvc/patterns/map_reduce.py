"""Map-reduce: one mapper per item with bounded concurrency, then a reducer.

Follows car-multi's map_reduce.rs: mapper `i` is `{mapper}_{i}` on
MAP_ITEM_TASK; outputs keep their item's index whatever happens to them; the
budget gates every mapper just before it starts (a refused one becomes a
skipped output at its index) and the reducer (refused: the mapper summaries
joined by newlines). Each summary is an answer cut to 300 bytes of UTF-8 at a
character boundary; the reducer's answer is the reduced answer even when its
output carries an error; an empty item list runs the reducer over
`Results from 0 sub-agents`. Unlike car-multi, the reducer's task is bounded
by construction (max_field_bytes): the summaries that do not fit are counted
in one closing line instead."""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import BUDGET_SKIPPED_PREFIX, RunInfra, succeeded
from carsvc.domain.runtime import PatternOutcome
from carsvc.domain.specs import Limits, Resolver, check_count, check_text, require_ref
from carsvc.patterns.prompts import (
    MAP_ITEM_TASK,
    MAP_SUMMARIES_OMITTED_LINE,
    MAP_SUMMARY_BYTES,
    MAP_SUMMARY_LINE,
    REDUCE_TASK,
)

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
DEFAULT_MAX_CONCURRENT = 5
log = logging.getLogger("carsvc.patterns")


def truncate(text: str, max_bytes: int) -> str:
    """car-multi's `truncate`: at most `max_bytes` bytes of UTF-8, cut at a
    character boundary."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    # A cut inside a character leaves an incomplete sequence only at the end.
    return data[:max_bytes].decode("utf-8", errors="ignore")


def reduce_task(task: str, count: int, lines: list[str], limit: int) -> str:
    """REDUCE_TASK over the summary `lines`: all of them when the task fits in
    `limit` bytes, else the first ones that fit and MAP_SUMMARIES_OMITTED_LINE
    saying how many were left out. With no room at all (an original task near
    the limit) the summaries are that one line."""
    room = limit - len(REDUCE_TASK.format(task=task, count=count, summaries="").encode())
    sizes = [len(line.encode()) for line in lines]
    if not lines or sum(sizes) + len(lines) - 1 <= room:
        return REDUCE_TASK.format(task=task, count=count, summaries="\n".join(lines))
    # The closing line's size with the largest count it can hold (the newline before it too).
    room -= len(MAP_SUMMARIES_OMITTED_LINE.format(omitted=len(lines), limit=limit).encode()) + 1
    kept, used = 0, 0
    for size in sizes:
        cost = size + (1 if kept else 0)
        if used + cost > room:
            break
        kept, used = kept + 1, used + cost
    closing = MAP_SUMMARIES_OMITTED_LINE.format(omitted=len(lines) - kept, limit=limit)
    return REDUCE_TASK.format(task=task, count=count, summaries="\n".join([*lines[:kept], closing]))


class MapReduce:
    name: ClassVar[str] = "map_reduce"

    def __init__(
        self,
        mapper: AgentSpec,
        reducer: AgentSpec,
        task: str,
        items: list[str],
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_task_bytes: int = Limits().max_field_bytes,
    ) -> None:
        self.mapper = mapper
        self.reducer = reducer
        self.task = task
        self.items = items
        self.max_concurrent = max_concurrent
        # The reducer's task is kept within this many bytes (max_field_bytes).
        self.max_task_bytes = max_task_bytes

    @classmethod
    def build(cls, msg: patterns_pb2.MapReduceRun, resolve: Resolver, limits: Limits) -> MapReduce:
        mapper = resolve(require_ref(msg, "mapper", "map_reduce"), "map_reduce.mapper")
        reducer = resolve(require_ref(msg, "reducer", "map_reduce"), "map_reduce.reducer")
        check_text(msg.task, "map_reduce.task", limits)
        # No items is fine: the reducer runs over "Results from 0 sub-agents" (car-multi).
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
        return cls(mapper, reducer, msg.task, list(msg.items), max_concurrent, limits.max_field_bytes)

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

        lines = [
            MAP_SUMMARY_LINE.format(name=o.name, answer=truncate(o.answer, MAP_SUMMARY_BYTES))
            for o in map_outputs
            if succeeded(o)
        ]
        reducer_output = await infra.admit(self.reducer.name, role="reducer", step="reduce")
        reducer_ran = reducer_output is None
        if reducer_output is None:
            task = reduce_task(self.task, len(map_outputs), lines, self.max_task_bytes)
            reducer_output = await infra.run_agent(self.reducer, task, role="reducer", step="reduce")
            # car-multi: `Ok(o) => o.answer`, whether or not the output carries an error.
            reduced = reducer_output.answer
        else:
            reduced = "\n".join(lines)
        result = patterns_pb2.MapReduceResult(
            task=self.task,
            map_outputs=map_outputs,
            reduced_answer=reduced,
            all_succeeded=all(succeeded(o) for o in map_outputs),
            reducer_output=reducer_output,
        )
        outcome = PatternOutcome(result)
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
        skipped = await infra.admit(name, role="mapper", index=i, step=f"map/{i}")
        if skipped is not None:
            return skipped
        spec = AgentSpec()
        spec.CopyFrom(self.mapper)
        spec.name = name
        task = MAP_ITEM_TASK.format(task=self.task, item=self.items[i])
        try:
            return await infra.run_agent(
                spec, task, role="mapper", step=f"map/{i}", index=i, agent=self.mapper.name
            )
        except Exception as exc:  # a bug must not shift the other items' indices
            log.exception("mapper %s of run %s failed inside the sidecar", name, infra.run_id)
            return AgentOutput(name=name, error=f"internal error: {exc}")
