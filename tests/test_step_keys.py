"""Every agent a pattern runs has a step key: its place in the pattern
(docs/patterns/README.md#step-keys). The keys are pinned here, run in-process
against a dispatcher that answers at once and records each agent's key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from google.protobuf.message import Message

from carsvc._proto.car.v1 import patterns_pb2, types_pb2, worker_pb2
from carsvc.config import Settings
from carsvc.domain.budget import CoordinationBudget
from carsvc.domain.eventlog import RunEventLog
from carsvc.domain.infra import RunInfra
from carsvc.domain.mailbox import Mailbox
from carsvc.domain.overlay import StateStore
from carsvc.domain.runtime import Pattern
from carsvc.domain.workers import Dispatcher
from carsvc.patterns.adversarial_review import AdversarialReview
from carsvc.patterns.advisor import Advisor
from carsvc.patterns.delegator import Delegator
from carsvc.patterns.fleet import Fleet
from carsvc.patterns.map_reduce import MapReduce
from carsvc.patterns.pipeline import Pipeline
from carsvc.patterns.single import Single
from carsvc.patterns.spawn_subtask import SpawnSubtask
from carsvc.patterns.supervisor import Supervisor
from carsvc.patterns.swarm import Swarm
from carsvc.patterns.tournament import Tournament
from carsvc.patterns.vote import Vote

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec


class StepRecorder:
    """A dispatcher stand-in: each agent answers `answers.get(name, "ok")` at
    once; before answering, an agent at a step in `calls` makes those runtime
    calls. The step keys are recorded in the order the agents start."""

    def __init__(
        self, answers: dict[str, str] | None = None, calls: dict[str, Sequence[tuple[str, Message]]] | None = None
    ) -> None:
        self.answers = answers or {}
        self.calls = calls or {}
        self.steps: list[str] = []

    async def execute(self, spec: AgentSpec, task: str, **kw: Any) -> AgentOutput:
        agent = kw["observer"]
        self.steps.append(agent.step)
        for op, call in self.calls.get(agent.step, ()):
            await agent.infra.hooks[op](agent, call)
        return AgentOutput(name=spec.name, answer=self.answers.get(spec.name, "ok"))

    def run_ended(self, run_id: str) -> None:
        pass


DEFAULTS = Settings()


async def steps_of(pattern: Pattern, recorder: StepRecorder | None = None) -> list[str]:
    recorder = recorder or StepRecorder()
    infra = RunInfra(
        run_id="run",
        thread_id="thread",
        state=StateStore(),
        budget=CoordinationBudget(),
        events=RunEventLog("run", 10_000),
        mailbox=Mailbox(),
        dispatcher=cast(Dispatcher, recorder),
        mailbox_recv_timeout=DEFAULTS.mailbox_recv_timeout_s,
        suspension_timeout=DEFAULTS.suspension_timeout_s,
        max_unmatched_decisions=DEFAULTS.max_unmatched_decisions,
        agent_timeout=None,
    )
    await pattern.run(infra)
    assert len(set(recorder.steps)) == len(recorder.steps), recorder.steps
    return recorder.steps


def agents(*names: str) -> list[AgentSpec]:
    return [AgentSpec(name=n) for n in names]


async def test_single_map_reduce_pipeline_fleet_and_vote() -> None:
    (a,) = agents("a")
    assert await steps_of(Single(a, "t")) == ["single"]
    mapper, reducer = agents("mapper", "reducer")
    steps = await steps_of(MapReduce(mapper, reducer, "t", ["x", "y", "z"], max_concurrent=2))
    assert sorted(steps[:3]) == ["map/0", "map/1", "map/2"] and steps[3:] == ["reduce"]
    assert await steps_of(Pipeline(agents("a", "b", "c"), "t")) == ["pipeline/0", "pipeline/1", "pipeline/2"]
    assert sorted(await steps_of(Fleet(agents("a", "b"), "t"))) == ["fleet/0", "fleet/1"]
    synthesizer = AgentSpec(name="s")
    steps = await steps_of(Vote(agents("a", "b"), "t", synthesizer))
    assert sorted(steps[:2]) == ["vote/0", "vote/1"] and steps[2:] == ["vote/synthesizer"]


async def test_swarm_in_each_mode() -> None:
    three, synthesizer = agents("a", "b", "c"), AgentSpec(name="s")
    steps = await steps_of(Swarm(three, patterns_pb2.SWARM_MODE_PARALLEL, "t", synthesizer))
    assert sorted(steps[:3]) == ["swarm/0", "swarm/1", "swarm/2"] and steps[3:] == ["swarm/synthesizer"]
    steps = await steps_of(Swarm(three, patterns_pb2.SWARM_MODE_SEQUENTIAL, "t"))
    assert steps == ["swarm/0", "swarm/1", "swarm/2"]
    steps = await steps_of(Swarm(three[:2], patterns_pb2.SWARM_MODE_DEBATE, "t", synthesizer))
    assert sorted(steps[:2]) == ["debate/round-1/agent-0", "debate/round-1/agent-1"]
    assert sorted(steps[2:4]) == ["debate/round-2/agent-0", "debate/round-2/agent-1"]
    assert steps[4:] == ["debate/judge"]


async def test_supervisor_rounds_review_and_tournament_matches() -> None:
    supervisor = AgentSpec(name="boss")
    steps = await steps_of(Supervisor(agents("w0", "w1"), supervisor, "t", max_rounds=2))
    assert sorted(steps) == sorted(
        [
            "supervisor/round-1/worker-0",
            "supervisor/round-1/worker-1",
            "supervisor/round-1/review",
            "supervisor/round-2/worker-0",
            "supervisor/round-2/worker-1",
            "supervisor/round-2/review",
        ]
    )
    judge = AgentSpec(name="judge")
    steps = await steps_of(Tournament(agents("a", "b", "c"), judge, "t"), StepRecorder({"judge_0": "B"}))
    assert sorted(steps[:3]) == ["tournament/0", "tournament/1", "tournament/2"]
    assert steps[3:] == ["tournament/round-1/match-0/judge", "tournament/round-2/match-1/judge"]
    reviewer = AgentSpec(name="reviewer")
    assert await steps_of(AdversarialReview(reviewer, "work", ["c"])) == ["review/reviewer"]


async def test_runtime_calls_key_the_agents_they_start() -> None:
    main, s1, s2 = agents("main", "s1", "s2")
    delegations: list[tuple[str, Message]] = [
        ("delegate", worker_pb2.DelegateCall(specialist="s1", subtask="x")),
        ("delegate", worker_pb2.DelegateCall(specialist="s2", subtask="y")),
        ("delegate", worker_pb2.DelegateCall(specialist="s1", subtask="z")),
    ]
    steps = await steps_of(Delegator(main, [s1, s2], "t"), StepRecorder(calls={"main": delegations}))
    assert steps == ["main", "delegate/s1/0", "delegate/s2/0", "delegate/s1/1"]

    spawns: list[tuple[str, Message]] = [("spawn_subtask", worker_pb2.SpawnSubtaskCall(task="x"))] * 2
    steps = await steps_of(SpawnSubtask(main, "t"), StepRecorder(calls={"main": spawns}))
    assert steps == ["main", "spawn/main/0", "spawn/main/1"]

    consults: list[tuple[str, Message]] = [("consult_advisor", worker_pb2.ConsultAdvisorCall(prompt="p"))] * 2
    advised, advisor = agents("agent", "advisor")
    steps = await steps_of(Advisor(advised, advisor, "t", max_uses=2), StepRecorder(calls={"agent": consults}))
    assert steps == ["agent", "advisor/0", "advisor/1"]
