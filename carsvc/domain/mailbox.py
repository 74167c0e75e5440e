"""Named, bounded message queues between the agents of one run."""

from __future__ import annotations

import asyncio

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.clock import now_ms
from carsvc.domain.errors import DeadlineExceeded, NotFound, ResourceExhausted

Message = types_pb2.Message


class _Slot:
    """A registered name; its queue is made on first use (most agents never
    touch their mailbox, and every agent run registers one)."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] | None = None


class Mailbox:
    """One queue per registered agent name. Sends never block: a full queue is
    an error (RESOURCE_EXHAUSTED) rather than a stalled sender."""

    __slots__ = ("_depth", "_queues")

    def __init__(self, depth: int = 1024) -> None:
        self._depth = depth
        self._queues: dict[str, _Slot] = {}

    def register(self, name: str) -> None:
        """Creates `name`'s queue; registering again replaces it (old mail is dropped)."""
        self._queues[name] = _Slot()

    def _queue(self, slot: _Slot) -> asyncio.Queue[Message]:
        if slot.queue is None:
            slot.queue = asyncio.Queue(self._depth)
        return slot.queue

    def unregister(self, name: str) -> None:
        self._queues.pop(name, None)

    def registered(self) -> list[str]:
        return sorted(self._queues)

    def send(self, message: Message) -> None:
        slot = self._queues.get(message.to_agent)
        if slot is None:
            raise NotFound(f"mailbox send error: no agent '{message.to_agent}'", field="to_agent")
        self._put(message.to_agent, self._queue(slot), message)

    def broadcast(self, message: Message) -> int:
        """Delivers a copy to every registered agent but the sender; returns how many."""
        delivered = 0
        for name, slot in self._queues.items():
            if name == message.from_agent:
                continue
            copy = Message()
            copy.CopyFrom(message)
            copy.to_agent = name
            self._put(name, self._queue(slot), copy)
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
        slot = self._queues.get(name)
        if slot is None:
            raise NotFound(f"mailbox recv error: no agent '{name}'")
        try:
            return await asyncio.wait_for(self._queue(slot).get(), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"mailbox recv timeout for agent '{name}'") from None
