"""Every agent a pattern runs has a step key: its place in the pattern
(docs/patterns/README.md#step-keys). The keys are pinned here, run in-process
in a PatternEnvironment (carsvc/testing.py), whose dispatcher records each key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.runtime import Pattern
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
from carsvc.testing import PatternEnvironment, ScriptedAgent

AgentSpec = types_pb2.AgentSpec


Calls = Callable[[ScriptedAgent], Awaitable[object]]


class StepRecorder:
    """The script: each agent answers `answers.get(name, "ok")`; before
    answering, an agent at a step in `calls` makes its runtime calls."""

    def __init__(self, answers: dict[str, str] | None = None, calls: dict[str, Calls] | None = None) -> None:
        self.answers = answers or {}
        self.calls = calls or {}

    async def __call__(self, agent: ScriptedAgent) -> str:
        if agent.step in self.calls:
            await self.calls[agent.step](agent)
        return self.answers.get(agent.name, "ok")


async def steps_of(pattern: Pattern, recorder: StepRecorder | None = None) -> list[str]:
    env = PatternEnvironment(recorder or StepRecorder())
    await env.run(pattern)
    steps = env.dispatcher.steps
    assert len(set(steps)) == len(steps), steps
    return steps


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

    async def delegations(agent: ScriptedAgent) -> None:
        for specialist, subtask in (("s1", "x"), ("s2", "y"), ("s1", "z")):
            await agent.delegate(specialist, subtask)

    steps = await steps_of(Delegator(main, [s1, s2], "t"), StepRecorder(calls={"main": delegations}))
    assert steps == ["main", "delegate/s1/0", "delegate/s2/0", "delegate/s1/1"]

    async def spawns(agent: ScriptedAgent) -> None:
        for task in ("x", "y"):
            await agent.spawn_subtask(task)

    steps = await steps_of(SpawnSubtask(main, "t"), StepRecorder(calls={"main": spawns}))
    assert steps == ["main", "spawn/main/0", "spawn/main/1"]

    async def consults(agent: ScriptedAgent) -> None:
        for _ in range(2):
            await agent.consult_advisor("p")

    advised, advisor = agents("agent", "advisor")
    steps = await steps_of(Advisor(advised, advisor, "t", max_uses=2), StepRecorder(calls={"agent": consults}))
    assert steps == ["agent", "advisor/0", "advisor/1"]
