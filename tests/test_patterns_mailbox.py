"""The mailbox the agents of a pattern share. Conformance items 36 and 37."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, swarm
from carsvc.domain.errors import NotFound
from carsvc.domain.mailbox import Mailbox
from carsvc.worker import AgentContext, RuntimeCallError
from tests.conftest import Workers


def message(to: str = "", frm: str = "x", text: str = "hi") -> types_pb2.Message:
    m = types_pb2.Message(to_agent=to, from_agent=frm)
    m.payload.string_value = text
    return m


async def test_send_to_an_unregistered_name_fails_and_broadcast_reaches_everyone() -> None:
    """Item 36."""
    box = Mailbox()
    for name in ("a", "b", "c"):
        box.register(name)
    with pytest.raises(NotFound) as err:
        box.send(message("ghost"))
    assert str(err.value) == "to_agent: mailbox send error: no agent 'ghost'"
    assert box.broadcast(message(frm="a", text="all")) == 2  # everyone but the sender
    for name in ("b", "c"):
        got = await box.recv(name, 1)
        assert (got.to_agent, got.payload.string_value, got.from_agent) == (name, "all", "a")


async def test_after_unregister_sends_to_that_name_fail() -> None:
    """Item 37."""
    box = Mailbox()
    box.register("a")
    box.send(message("a"))
    box.unregister("a")
    with pytest.raises(NotFound):
        box.send(message("a"))
    assert box.registered() == []


async def test_agents_of_a_parallel_swarm_broadcast_to_each_other(client: Client, workers: Workers) -> None:
    """Over the wire: a broadcast reaches every running agent of the run; once an
    agent has finished, mail to it is refused."""
    registered = asyncio.Event()
    count = 0
    heard: dict[str, str] = {}
    late: list[grpc.StatusCode] = []

    async def member(ctx: AgentContext) -> str:
        nonlocal count
        count += 1
        if count == 3:
            registered.set()
        await asyncio.wait_for(registered.wait(), 5)
        if ctx.name == "a":
            await ctx.broadcast("standup")
            return "sent"
        heard[ctx.name] = (await ctx.recv(timeout=5)).payload.string_value
        if ctx.name == "c":
            await asyncio.sleep(0.05)  # a has finished by now
            try:
                await ctx.send("a", "too late")
            except RuntimeCallError as err:
                late.append(err.code)
        return "heard"

    await workers.start({"*": member}, max_in_flight=3)
    run = await client.run(swarm([agent("a"), agent("b"), agent("c")], "t"))
    assert [o.answer for o in run.result.swarm.outputs] == ["sent", "heard", "heard"]
    assert heard == {"b": "standup", "c": "standup"}
    assert late == [grpc.StatusCode.NOT_FOUND]
