"""Redis out of reach, as the domain says it: Unavailable (a client retries, or
moves to another replica), not an internal error."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import redis

from carsvc.domain.errors import Unavailable

P = ParamSpec("P")
T = TypeVar("T")


def reachable(call: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turns redis-py's connection errors (after its own retries) into Unavailable."""

    @functools.wraps(call)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise Unavailable(f"Redis cannot be reached ({err}); retry") from None

    return wrapper
