"""Coordination patterns, keyed by the name of their member in the run request's
`pattern` oneof. Each pattern builds itself from its request message (checking
it, resolving agents) and runs against a RunInfra. docs/patterns/ has a page
per pattern."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carsvc.domain.runtime import Pattern
from carsvc.domain.specs import Limits, Resolver
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

Builder = Callable[[Any, Resolver, Limits], Pattern]

BUILDERS: dict[str, Builder] = {
    p.name: p.build
    for p in (
        Single,
        Swarm,
        Pipeline,
        Supervisor,
        Delegator,
        SpawnSubtask,
        MapReduce,
        Vote,
        Fleet,
        AdversarialReview,
        Tournament,
        Advisor,
    )
}

__all__ = ["BUILDERS", "Builder"]
