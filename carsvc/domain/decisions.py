"""Human-in-the-loop decisions for one run's suspended tool calls.

An agent suspends a tool call and waits; a client answers with a decision
(resume with a value, or cancel with a reason). Decisions that arrive before
their suspension are kept (bounded, all of them, as tirea keeps every decision
sent before the agent waits) and delivered first-in first-out, one per
suspension of their tool call; a decision id is applied at most once; a
suspension that waits too long is cancelled with a clear reason."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from carsvc._proto.car.v1 import events_pb2, types_pb2, worker_pb2
from carsvc.domain.clock import now_ms
from carsvc.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted

ToolCallDecision = types_pb2.ToolCallDecision
RESUME = types_pb2.DECISION_ACTION_RESUME
CANCEL = types_pb2.DECISION_ACTION_CANCEL
_REMEMBERED_IDS = 10_000


@dataclass(slots=True)
class Outcome:
    """What SubmitDecisions did with each decision, by decision id."""

    applied: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def decision_key(decision: ToolCallDecision) -> str:
    """The idempotency key: the decision id, or one derived from the target."""
    return decision.decision_id or f"decision_{decision.target_id}"


def check_decisions(decisions: list[ToolCallDecision], field_name: str = "decisions") -> None:
    if not decisions:
        raise InvalidArgument("must hold at least one decision", field=field_name)
    for i, d in enumerate(decisions):
        if not d.target_id:
            raise InvalidArgument("must name the suspended tool call", field=f"{field_name}[{i}].target_id")
        if d.action not in (RESUME, CANCEL):
            raise InvalidArgument("must be RESUME or CANCEL", field=f"{field_name}[{i}].action")


class DecisionBox:
    """One run's suspended tool calls and the decisions waiting for them."""

    def __init__(
        self,
        emit: Callable[[events_pb2.RunEvent], object],
        *,
        max_unmatched: int,
        default_timeout: float,
    ) -> None:
        self._emit = emit
        self.max_unmatched = max_unmatched
        self.default_timeout = default_timeout
        self._waiting: dict[str, asyncio.Future[ToolCallDecision]] = {}
        # Early decisions by tool call id, oldest first; their keys; their count.
        self._unmatched: dict[str, deque[ToolCallDecision]] = {}
        self._unmatched_keys: set[str] = set()
        self._unmatched_count = 0
        self._applied: OrderedDict[str, None] = OrderedDict()
        self._closed = False
        # Called with True when the first suspension opens, False when the last closes.
        self.on_waiting: Callable[[bool], None] = lambda waiting: None

    def submit(self, decisions: list[ToolCallDecision]) -> Outcome:
        """Delivers each decision to its waiting tool call, or keeps it for later."""
        if self._closed:
            raise FailedPrecondition("the run has finished; no tool call is waiting for a decision")
        outcome = Outcome()
        for d in decisions:
            key = decision_key(d)
            if key in self._applied or key in self._unmatched_keys:
                outcome.duplicates.append(key)
                continue
            future = self._waiting.get(d.target_id)
            if future is not None and not future.done():
                self._remember(key)
                future.set_result(d)
                outcome.applied.append(key)
                continue
            if self._unmatched_count >= self.max_unmatched:
                raise ResourceExhausted(
                    f"{self._unmatched_count} decisions already wait for a tool call that has not "
                    f"suspended (max {self.max_unmatched}); decision '{key}' was not kept",
                    field="decisions",
                )
            queue = self._unmatched.get(d.target_id)
            if queue is None:
                queue = self._unmatched[d.target_id] = deque()
            queue.append(d)
            self._unmatched_keys.add(key)
            self._unmatched_count += 1
            outcome.queued.append(key)
        return outcome

    async def suspend(
        self,
        agent: str,
        assignment_id: str,
        call: worker_pb2.SuspendToolCall,
    ) -> ToolCallDecision:
        """Waits for the decision on one tool call (delivered at once if it came early)."""
        if not call.tool_call_id:
            raise InvalidArgument("must not be empty", field="suspend_tool_call.tool_call_id")
        if call.tool_call_id in self._waiting:
            raise AlreadyExists(
                f"tool call '{call.tool_call_id}' is already suspended", field="suspend_tool_call.tool_call_id"
            )
        if self._closed:
            raise FailedPrecondition("the run has finished")
        timeout = call.timeout_ms / 1000 if call.timeout_ms else self.default_timeout
        early = self._take_early(call.tool_call_id)
        # Watchers always see what was suspended, and with which arguments, before
        # what was decided (an early decision too).
        self._suspended(agent, assignment_id, call, timeout)
        if early is not None:
            self._remember(decision_key(early))
            self._resumed(call.tool_call_id, early)
            return early
        future: asyncio.Future[ToolCallDecision] = asyncio.get_running_loop().create_future()
        self._waiting[call.tool_call_id] = future
        if len(self._waiting) == 1:
            self.on_waiting(True)
        try:
            decision = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            decision = ToolCallDecision(
                target_id=call.tool_call_id,
                decision_id=f"timeout_{call.tool_call_id}",
                action=CANCEL,
                reason=f"no decision within {timeout:g}s; the tool call was cancelled",
                updated_unix_ms=now_ms(),
            )
        finally:
            del self._waiting[call.tool_call_id]
            if not self._waiting and not self._closed:
                self.on_waiting(False)
        self._resumed(call.tool_call_id, decision)
        return decision

    def _take_early(self, tool_call_id: str) -> ToolCallDecision | None:
        """The oldest decision kept for `tool_call_id`, taken (each is delivered once)."""
        queue = self._unmatched.get(tool_call_id)
        if not queue:
            return None
        early = queue.popleft()
        if not queue:
            del self._unmatched[tool_call_id]
        self._unmatched_keys.discard(decision_key(early))
        self._unmatched_count -= 1
        return early

    def _suspended(self, agent: str, assignment_id: str, call: worker_pb2.SuspendToolCall, timeout: float) -> None:
        suspended = events_pb2.ToolCallSuspended(
            agent=agent,
            assignment_id=assignment_id,
            tool_call_id=call.tool_call_id,
            tool_name=call.tool_name,
            reason=call.reason,
            deadline_unix_ms=now_ms() + int(timeout * 1000),
        )
        if call.HasField("arguments"):
            suspended.arguments.CopyFrom(call.arguments)
        self._emit(events_pb2.RunEvent(tool_call_suspended=suspended))

    def _resumed(self, tool_call_id: str, decision: ToolCallDecision) -> None:
        if self._closed:  # the run's log is closed; run_finished was its last event
            return
        self._emit(
            events_pb2.RunEvent(
                tool_call_resumed=events_pb2.ToolCallResumed(tool_call_id=tool_call_id, decision=decision)
            )
        )

    def _remember(self, key: str) -> None:
        self._applied[key] = None
        if len(self._applied) > _REMEMBERED_IDS:
            self._applied.popitem(last=False)

    def close(self) -> None:
        """The run ended: waiting tool calls are cancelled, nothing more is accepted."""
        self._closed = True
        for tool_call_id, future in self._waiting.items():
            if not future.done():
                future.set_result(
                    ToolCallDecision(
                        target_id=tool_call_id,
                        decision_id=f"run_ended_{tool_call_id}",
                        action=CANCEL,
                        reason="the run ended before a decision arrived",
                    )
                )
