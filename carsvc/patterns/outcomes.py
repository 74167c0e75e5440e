"""How the patterns read their agents' outputs into the run's outcome: a
skipped output, and the failed outcome a missing product makes."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.infra import BUDGET_SKIPPED_PREFIX
from carsvc.domain.runtime import PatternOutcome, error_text

AgentOutput = types_pb2.AgentOutput


def is_skipped(output: AgentOutput) -> bool:
    """Whether `output` is the skipped output of an agent the budget refused."""
    return output.HasField("error") and output.error.startswith(BUDGET_SKIPPED_PREFIX)


def agent_failure(result: Message, output: AgentOutput, what: str) -> PatternOutcome:
    """The outcome of a run whose product depended on `output`, which failed:
    budget_exhausted when the budget refused the agent, else agent_failed."""
    reason = "budget_exhausted" if is_skipped(output) else "agent_failed"
    detail = f"{what} '{output.name}' failed: {error_text(output)}"
    return PatternOutcome(result, failed=True, reason=reason, detail=detail)


def no_output(result: Message, outputs: Sequence[AgentOutput]) -> PatternOutcome:
    """The outcome of a run none of whose agents produced an answer (car-multi's
    NoOutput): budget_exhausted when the budget refused every one of them."""
    reason = "budget_exhausted" if outputs and all(is_skipped(o) for o in outputs) else "agent_failed"
    return PatternOutcome(result, failed=True, reason=reason, detail="no agents produced output")
