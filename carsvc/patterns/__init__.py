"""Coordination patterns, keyed by the name of their member in the run request's
`pattern` oneof. Each pattern builds itself from its request message (checking
it, resolving agents) and runs against a RunInfra."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carsvc.patterns.base import Limits, Pattern, PatternOutcome, Resolver
from carsvc.patterns.map_reduce import MapReduce
from carsvc.patterns.single import Single

Builder = Callable[[Any, Resolver, Limits], Pattern]

BUILDERS: dict[str, Builder] = {
    Single.name: Single.build,
    MapReduce.name: MapReduce.build,
}

__all__ = ["BUILDERS", "Limits", "Pattern", "PatternOutcome", "Resolver"]
