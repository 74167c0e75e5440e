"""AdversarialReview: a fresh reviewer with no author context judges a work output.

The reviewer gets REVIEW_TASK: the work output and the numbered criteria,
nothing else (not the author, not the author's task or conversation). Its reply
is parsed as JSON findings; a reply that cannot be parsed becomes a single
`inconclusive` finding whose evidence is at most the first 1,024 characters of
the reply (neither approval nor rejection; the review does not pass).

`passed` = at least one finding, none inconclusive, every finding passed, and,
with `fail_on_blockers` (the default), no finding of severity `blocker` at all
(a blocker fails the review even if the reviewer marked it passed).
See docs/patterns/adversarial_review.md."""

from __future__ import annotations

from typing import Any, ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import RunInfra, succeeded
from carsvc.domain.runtime import Job, PatternOutcome, error_text, run_gated
from carsvc.domain.specs import Limits, Resolver, check_count, check_text, require_ref
from carsvc.patterns.answers import extract_json
from carsvc.patterns.outcomes import agent_failure
from carsvc.patterns.prompts import REVIEW_CRITERION_LINE, REVIEW_TASK

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
ReviewFinding = patterns_pb2.ReviewFinding
Severity = patterns_pb2.Severity

INCONCLUSIVE_EVIDENCE_CAP = 1024
SEVERITIES = {
    "blocker": patterns_pb2.SEVERITY_BLOCKER,
    "major": patterns_pb2.SEVERITY_MAJOR,
    "minor": patterns_pb2.SEVERITY_MINOR,
    "info": patterns_pb2.SEVERITY_INFO,
}


def parse_findings(reply: str) -> list[ReviewFinding] | None:
    """Findings from a reviewer's reply, or None when it cannot be parsed.

    Accepted: `{"findings": [...]}` or a bare list, the JSON alone, fenced, or
    embedded in text. Each finding needs `criterion` (non-empty string) and
    `passed` (boolean); `evidence` defaults to ""; `severity` is one of
    blocker|major|minor|info (any case) and defaults to info for a passed
    finding, major for a failed one. No findings at all counts as unparseable."""
    data: Any = extract_json(reply)
    if isinstance(data, dict):
        data = data.get("findings")
    if not isinstance(data, list) or not data:
        return None
    findings: list[ReviewFinding] = []
    for item in data:
        if not isinstance(item, dict):
            return None
        criterion, passed = item.get("criterion"), item.get("passed")
        evidence, severity = item.get("evidence", ""), item.get("severity")
        if not isinstance(criterion, str) or not criterion.strip() or not isinstance(passed, bool):
            return None
        if not isinstance(evidence, str):
            return None
        if severity is None:
            level = patterns_pb2.SEVERITY_INFO if passed else patterns_pb2.SEVERITY_MAJOR
        elif isinstance(severity, str) and severity.strip().lower() in SEVERITIES:
            level = SEVERITIES[severity.strip().lower()]
        else:
            return None
        findings.append(ReviewFinding(criterion=criterion, passed=passed, evidence=evidence, severity=level))
    return findings


def inconclusive(evidence: str) -> ReviewFinding:
    """The one finding of a review that could not be read: not adversarially
    verified, so neither approval nor rejection (and not a pass)."""
    return ReviewFinding(
        criterion="",
        passed=False,
        evidence=evidence[:INCONCLUSIVE_EVIDENCE_CAP],
        severity=patterns_pb2.SEVERITY_INCONCLUSIVE,
    )


def verdict(findings: list[ReviewFinding], fail_on_blockers: bool) -> bool:
    if not findings:
        return False
    for f in findings:
        if f.severity == patterns_pb2.SEVERITY_INCONCLUSIVE or not f.passed:
            return False
        if fail_on_blockers and f.severity == patterns_pb2.SEVERITY_BLOCKER:
            return False
    return True


class AdversarialReview:
    name: ClassVar[str] = "adversarial_review"

    def __init__(
        self, reviewer: AgentSpec, work_output: str, criteria: list[str], fail_on_blockers: bool = True
    ) -> None:
        self.reviewer = reviewer
        self.work_output = work_output
        self.criteria = criteria
        self.fail_on_blockers = fail_on_blockers

    @classmethod
    def build(cls, msg: patterns_pb2.AdversarialReviewRun, resolve: Resolver, limits: Limits) -> AdversarialReview:
        reviewer = resolve(require_ref(msg, "reviewer", "adversarial_review"), "adversarial_review.reviewer")
        if msg.author and msg.author == reviewer.name:
            raise InvalidArgument(
                f"'{reviewer.name}' is the author; the reviewer must be a different, fresh agent",
                field="adversarial_review.reviewer",
            )
        if not msg.work_output.strip():
            raise InvalidArgument("must not be empty", field="adversarial_review.work_output")
        check_text(msg.work_output, "adversarial_review.work_output", limits)
        if not msg.criteria:
            raise InvalidArgument("must hold at least one criterion", field="adversarial_review.criteria")
        check_count(len(msg.criteria), "adversarial_review.criteria", limits.max_items, "criteria")
        for i, criterion in enumerate(msg.criteria):
            if not criterion.strip():
                raise InvalidArgument("must not be empty", field=f"adversarial_review.criteria[{i}]")
            check_text(criterion, f"adversarial_review.criteria[{i}]", limits)
        fail_on_blockers = msg.fail_on_blockers if msg.HasField("fail_on_blockers") else True
        return cls(reviewer, msg.work_output, list(msg.criteria), fail_on_blockers)

    def task(self) -> str:
        criteria = "\n".join(
            REVIEW_CRITERION_LINE.format(number=i, criterion=c) for i, c in enumerate(self.criteria, start=1)
        )
        return REVIEW_TASK.format(work_output=self.work_output, criteria=criteria)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        output = await run_gated(infra, Job(self.reviewer, self.task(), role="reviewer", step="review/reviewer"))
        result = patterns_pb2.AdversarialReviewResult(reviewer_output=output, criteria=self.criteria)
        if not succeeded(output):
            result.findings.append(inconclusive(f"the reviewer produced no review: {error_text(output)}"))
            return agent_failure(result, output, "reviewer")
        findings = parse_findings(output.answer)
        if findings is None:
            findings = [inconclusive(output.answer)]
        result.findings.extend(findings)
        result.blockers = sum(1 for f in findings if f.severity == patterns_pb2.SEVERITY_BLOCKER)
        result.passed = verdict(findings, self.fail_on_blockers)
        return PatternOutcome(result)
