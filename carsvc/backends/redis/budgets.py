"""Shared budgets in Redis: one hash per budget with its limits and counters,
changed only by Lua scripts, so every replica's admissions are exact (however
many race, `max_agents` never over-admits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio

from carsvc.backends.redis import keys
from carsvc.backends.redis.errors import reachable
from carsvc.domain.budget_types import (
    INT64_MAX,
    AgentLimitReached,
    BudgetError,
    BudgetExhausted,
    BudgetLimits,
    BudgetSnapshot,
    checked_cost_micros,
    checked_tokens,
    usd_to_micros,
)
from carsvc.domain.errors import AlreadyExists, NotFound

# Limits are stored as integers, -1 for none; cost in micro-dollars.
_LIMITS = ("max_input", "max_output", "max_total", "max_cost", "max_agents")
_COUNTERS = ("input", "output", "cost", "started", "denied")

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'max_input', ARGV[1], 'max_output', ARGV[2], 'max_total', ARGV[3],
           'max_cost', ARGV[4], 'max_agents', ARGV[5], 'input', 0, 'output', 0, 'cost', 0,
           'started', 0, 'denied', 0)
return 1
"""

# ARGV[1]: how many agents ask, then their steps. KEYS[2] (optional): the run's
# set of admitted steps, where each admitted step is added in the same script
# (a resumed run does not ask again for a step counted before). Returns
# {counters..., verdict per agent}: 0 admitted, 1 a spend limit is reached, 2
# max_agents is reached.
_BEGIN = """
local b = redis.call('HMGET', KEYS[1], 'max_input', 'max_output', 'max_total', 'max_cost', 'max_agents',
                     'input', 'output', 'cost', 'started', 'denied')
if not b[1] then return false end
local lim = {}
for i = 1, 5 do lim[i] = tonumber(b[i]) end
local input, output, cost = tonumber(b[6]), tonumber(b[7]), tonumber(b[8])
local started, denied = tonumber(b[9]), tonumber(b[10])
local function reached(limit, value) return limit >= 0 and value >= limit end
local spent = reached(lim[1], input) or reached(lim[2], output) or reached(lim[3], input + output)
              or reached(lim[4], cost)
local verdicts = {}
for i = 1, tonumber(ARGV[1]) do
  if spent then denied = denied + 1; verdicts[i] = 1
  elseif reached(lim[5], started) then denied = denied + 1; verdicts[i] = 2
  else
    started = started + 1; verdicts[i] = 0
    if KEYS[2] and ARGV[1 + i] then redis.call('SADD', KEYS[2], ARGV[1 + i]) end
  end
end
redis.call('HSET', KEYS[1], 'started', started, 'denied', denied)
local out = {input, output, cost, started, denied}
for i = 1, #verdicts do out[5 + i] = verdicts[i] end
return out
"""

# ARGV: input tokens, output tokens, cost micros. Counters saturate at 2^63-1.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local names = {'input', 'output', 'cost'}
local out = {}
for i = 1, 3 do
  local add = tonumber(ARGV[i])
  local now = tonumber(redis.call('HGET', KEYS[1], names[i]))
  if now > 9223372036854775807 - add then
    redis.call('HSET', KEYS[1], names[i], '9223372036854775807')
  else
    redis.call('HINCRBY', KEYS[1], names[i], add)
  end
end
return redis.call('HMGET', KEYS[1], 'input', 'output', 'cost', 'started', 'denied')
"""


class RedisBudget:
    """A shared budget as this replica last saw it; admissions and spend go to Redis."""

    def __init__(self, budgets: RedisBudgets, budget_id: str, limits: BudgetLimits, counters: list[int]) -> None:
        self._budgets = budgets
        self._budget_id = budget_id
        self._limits = limits
        self._counters = counters

    @property
    def budget_id(self) -> str:
        return self._budget_id

    @property
    def limits(self) -> BudgetLimits:
        return self._limits

    def snapshot(self) -> BudgetSnapshot:
        return self._snapshot(self._counters)

    def _snapshot(self, counters: list[int]) -> BudgetSnapshot:
        spent_in, spent_out, cost, started, denied = counters
        return BudgetSnapshot(
            input_tokens=spent_in,
            output_tokens=spent_out,
            total_tokens=min(spent_in + spent_out, INT64_MAX),
            cost_usd=cost / 1_000_000,
            agents_started=started,
            limits=self._limits,
            exhausted=spend_reason(self._limits, spent_in, spent_out, cost) is not None,
            agents_denied=denied,
            budget_id=self._budget_id,
        )

    @reachable
    async def begin_agents(
        self, count: int, *, run_id: str = "", steps: Sequence[str] = ()
    ) -> list[BudgetError | None]:
        names = [keys.budget(self._budget_id)]
        if run_id and steps:
            names.append(keys.admitted(run_id))
        reply = await self._budgets.begin(keys=names, args=[count, *steps])
        if reply is None:
            raise NotFound(f"no budget '{self._budget_id}'", field="budget_id")
        counters = [int(v) for v in reply[:5]]
        self._counters = counters
        verdicts: list[BudgetError | None] = []
        for verdict in reply[5:]:
            if verdict == 0:
                verdicts.append(None)
            elif verdict == 1:
                reason = spend_reason(self._limits, *counters[:3]) or "a spend limit is reached"
                verdicts.append(BudgetExhausted(reason, self._snapshot(counters)))
            else:
                verdicts.append(AgentLimitReached(self._limits.max_agents or 0, counters[3]))
        return verdicts

    @reachable
    async def record(self, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        args = [checked_tokens("input_tokens", input_tokens), checked_tokens("output_tokens", output_tokens)]
        args.append(checked_cost_micros(cost_usd))
        reply = await self._budgets.record(keys=[keys.budget(self._budget_id)], args=args)
        if reply is not None:
            self._counters = [int(v) for v in reply]

    @reachable
    async def refresh(self) -> RedisBudget:
        data: list[Any] = await self._budgets.redis.hmget(keys.budget(self._budget_id), list(_COUNTERS))
        if data[0] is None:
            raise NotFound(f"no budget '{self._budget_id}'", field="budget_id")
        self._counters = [int(v) for v in data]
        return self


class RedisBudgets:
    """`BudgetStore` on Redis."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_CREATE)
        self.begin = client.register_script(_BEGIN)
        self.record = client.register_script(_RECORD)

    @reachable
    async def create(self, limits: BudgetLimits, budget_id: str) -> RedisBudget:
        created = await self._create(keys=[keys.budget(budget_id)], args=_encode(limits))
        if not created:
            raise AlreadyExists(f"budget '{budget_id}' already exists", field="budget_id")
        return RedisBudget(self, budget_id, limits, [0, 0, 0, 0, 0])

    @reachable
    async def get(self, budget_id: str) -> RedisBudget:
        data: list[Any] = await self.redis.hmget(keys.budget(budget_id), [*_LIMITS, *_COUNTERS])
        if data[0] is None:
            raise NotFound(f"no budget '{budget_id}'", field="budget_id")
        return RedisBudget(self, budget_id, _decode([int(v) for v in data[:5]]), [int(v) for v in data[5:]])


def spend_reason(limits: BudgetLimits, input_tokens: int, output_tokens: int, cost_micros: int) -> str | None:
    """Why a spend limit is reached, in the words of the in-process budget."""
    if limits.max_input_tokens is not None and input_tokens >= limits.max_input_tokens:
        return f"max_input_tokens reached: {input_tokens} of {limits.max_input_tokens}"
    if limits.max_output_tokens is not None and output_tokens >= limits.max_output_tokens:
        return f"max_output_tokens reached: {output_tokens} of {limits.max_output_tokens}"
    total = min(input_tokens + output_tokens, INT64_MAX)
    if limits.max_total_tokens is not None and total >= limits.max_total_tokens:
        return f"max_total_tokens reached: {total} of {limits.max_total_tokens}"
    if limits.max_cost_usd is not None and cost_micros >= usd_to_micros(limits.max_cost_usd):
        return f"max_cost_usd reached: {cost_micros / 1_000_000} of {usd_to_micros(limits.max_cost_usd) / 1_000_000}"
    return None


def _encode(limits: BudgetLimits) -> list[int]:
    cost = usd_to_micros(limits.max_cost_usd) if limits.max_cost_usd is not None else None
    values = (limits.max_input_tokens, limits.max_output_tokens, limits.max_total_tokens, cost, limits.max_agents)
    return [-1 if v is None else v for v in values]


def _decode(values: list[int]) -> BudgetLimits:
    max_input, max_output, max_total, max_cost, max_agents = (None if v < 0 else v for v in values)
    return BudgetLimits(
        max_input_tokens=max_input,
        max_output_tokens=max_output,
        max_total_tokens=max_total,
        max_cost_usd=max_cost / 1_000_000 if max_cost is not None else None,
        max_agents=max_agents,
    )
