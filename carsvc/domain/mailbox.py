"""Named, bounded message queues between the agents of one run."""

from __future__ import annotations

import asyncio

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.clock import now_ms
from carsvc.domain.errors import DeadlineExceeded, NotFound, ResourceExhausted

Message = types_pb2.Message


class Mailbox:
    """One queue per registered agent name. Sends never block: a full queue is
    an error (RESOURCE_EXHAUSTED) rather than a stalled sender."""

    __slots__ = ("_depth", "_queues")

    def __init__(self, depth: int = 1024) -> None:
        self._depth = depth
        self._queues: dict[str, asyncio.Queue[Message]] = {}

    def register(self, name: str) -> None:
        """Creates `name`'s queue; registering again replaces it (old mail is dropped)."""
        self._queues[name] = asyncio.Queue(self._depth)

    def unregister(self, name: str) -> None:
        self._queues.pop(name, None)

    def registered(self) -> list[str]:
        return sorted(self._queues)

    def send(self, message: Message) -> None:
        queue = self._queues.get(message.to_agent)
        if queue is None:
            raise NotFound(f"mailbox send error: no agent '{message.to_agent}'", field="to_agent")
        self._put(message.to_agent, queue, message)

    def broadcast(self, message: Message) -> int:
        """Delivers a copy to every registered agent but the sender; returns how many."""
        delivered = 0
        for name, queue in self._queues.items():
            if name == message.from_agent:
                continue
            copy = Message()
            copy.CopyFrom(message)
            copy.to_agent = name
            self._put(name, queue, copy)
            delivered += 1
        return delivered

    def _put(self, name: str, queue: asyncio.Queue[Message], message: Message) -> None:
        if not message.time_unix_ms:
            message.time_unix_ms = now_ms()
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:
            raise ResourceExhausted(
                f"mailbox send error: the mailbox of agent '{name}' is full "
                f"({self._depth} messages waiting)"
            ) from None

    async def recv(self, name: str, timeout: float) -> Message:
        queue = self._queues.get(name)
        if queue is None:
            raise NotFound(f"mailbox recv error: no agent '{name}'")
        try:
            return await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"mailbox recv timeout for agent '{name}'") from None
