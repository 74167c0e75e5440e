"""Run handles, one run per thread, ownership, watchers, and human-in-the-loop
decisions (tirea's registry, made stricter)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import ClassVar

import grpc
import pytest

from carsvc._proto.car.v1 import patterns_pb2, runs_pb2, types_pb2
from carsvc.backends.memory import MemoryBackend
from carsvc.client import Client, agent, deny, resume, single
from carsvc.config import Settings
from carsvc.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from carsvc.domain.infra import RunInfra
from carsvc.domain.runs import ON_BUSY_ENQUEUE, ON_BUSY_INTERRUPT, RunManager, RunSettings
from carsvc.domain.runtime import PatternOutcome
from carsvc.domain.workers import Dispatcher
from carsvc.worker import AgentContext, Decision
from tests.conftest import Workers


def _manager() -> RunManager:
    settings = Settings()
    return RunManager(Dispatcher.from_settings(settings), RunSettings.from_settings(settings), MemoryBackend())

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
CANCELLED = types_pb2.RUN_STATUS_CANCELLED
WAITING = types_pb2.RUN_STATUS_WAITING


class Hold:
    """A pattern that runs until released (for registry tests without workers)."""

    name: ClassVar[str] = "hold"

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def run(self, infra: RunInfra) -> PatternOutcome:
        await self.release.wait()
        return PatternOutcome(patterns_pb2.SingleResult())


# -- the registry (seed 004's thread_run tests, translated) ---------------------------


async def test_register_and_look_up_by_thread_and_run_id() -> None:
    runs = _manager()
    pattern = Hold()
    record = await runs.start(pattern, thread_id="t", agent_id="owner", run_id="r")
    assert runs.get("r") is record
    assert runs.by_thread("t") is record
    assert runs.active_run("t") is record
    record.check_owner("owner")
    with pytest.raises(Exception, match="belongs to agent_id 'owner'"):
        record.check_owner("other")
    pattern.release.set()
    await record.done.wait()


async def test_one_active_run_per_thread_and_ending_frees_the_thread() -> None:
    runs = _manager()
    first = Hold()
    a = await runs.start(first, thread_id="t", run_id="a")
    with pytest.raises(FailedPrecondition, match="already has an active run 'a'"):
        await runs.start(Hold(), thread_id="t", run_id="b")
    assert "b" not in runs.runs
    first.release.set()
    await a.done.wait()
    assert runs.active_run("t") is None  # removing the run cleaned the thread index
    second = Hold()
    b = await runs.start(second, thread_id="t", run_id="b")
    assert runs.active_run("t") is b and runs.get("a").finished
    second.release.set()
    await b.done.wait()


async def test_enqueue_starts_after_the_active_run_and_is_bounded() -> None:
    runs = _manager()
    first, second = Hold(), Hold()
    a = await runs.start(first, thread_id="t", run_id="a")
    b = await runs.start(second, thread_id="t", run_id="b", on_busy=ON_BUSY_ENQUEUE)
    assert b.status == types_pb2.RUN_STATUS_PENDING
    first.release.set()
    await a.done.wait()
    assert b.status == types_pb2.RUN_STATUS_RUNNING and runs.active_run("t") is b
    runs.settings = dataclasses.replace(runs.settings, max_queued_per_thread=1)
    await runs.start(Hold(), thread_id="t", run_id="c", on_busy=ON_BUSY_ENQUEUE)
    with pytest.raises(Exception, match="already has 1 queued runs"):
        await runs.start(Hold(), thread_id="t", run_id="d", on_busy=ON_BUSY_ENQUEUE)
    await runs.cancel(runs.get("c"), "not needed")
    assert runs.get("c").status == CANCELLED
    second.release.set()
    await b.done.wait()
    assert runs.active_run("t") is None


async def test_interrupt_cancels_the_active_run_then_starts() -> None:
    runs = _manager()
    old = await runs.start(Hold(), thread_id="t", run_id="old")
    new_pattern = Hold()
    new = await runs.start(new_pattern, thread_id="t", run_id="new", on_busy=ON_BUSY_INTERRUPT)
    await old.done.wait()
    assert old.status == CANCELLED and old.termination_detail == "interrupted by run 'new'"
    await asyncio.sleep(0)
    assert new.status == types_pb2.RUN_STATUS_RUNNING
    new_pattern.release.set()
    await new.done.wait()


async def test_fan_out_subscribers_see_the_same_events() -> None:
    runs = _manager()
    pattern = Hold()
    record = await runs.start(pattern, thread_id="t")
    subscriptions = [record.events.subscribe(0, 100) for _ in range(3)]
    pattern.release.set()
    seen = [[e.seq for batch in [b async for b in s.batches()] for e in batch] for s in subscriptions]
    assert seen[0] == seen[1] == seen[2] == [1, 2]


def test_lookups_name_the_field() -> None:
    runs = _manager()
    with pytest.raises(NotFound, match="run_id"):
        runs.get("nope")
    with pytest.raises(InvalidArgument, match="give run_id or thread_id"):
        runs.locate("", "")


# -- human in the loop, end to end -------------------------------------------------------


def approver(decisions: list[Decision], tool: str = "shell"):  # type: ignore[no-untyped-def]
    async def handler(ctx: AgentContext) -> str:
        decision = await ctx.suspend_tool_call("call-1", tool, {"cmd": "rm -rf build"}, reason="destructive")
        decisions.append(decision)
        return f"approved: {decision.result}" if decision.approved else f"denied: {decision.reason}"

    return handler


async def test_approval_end_to_end(client: Client, workers: Workers) -> None:
    decisions: list[Decision] = []
    await workers.start({"ops": approver(decisions)})
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "clean up"), agent_id="alice")
    events = client.watch(handle.run_id)
    suspended = None
    async for event in events:
        if event.WhichOneof("kind") == "tool_call_suspended":
            suspended = event.tool_call_suspended
            break
    assert suspended is not None
    assert (suspended.tool_call_id, suspended.tool_name, suspended.reason) == ("call-1", "shell", "destructive")
    assert suspended.arguments.struct_value.fields["cmd"].string_value == "rm -rf build"
    assert (await client.get_run(handle.run_id)).status == WAITING
    response = await client.submit_decisions(
        resume("call-1", {"exit": 0}, decision_id="d1"), run_id=handle.run_id, agent_id="alice"
    )
    assert list(response.applied_decision_ids) == ["d1"]
    rest = [e async for e in events]
    kinds = [e.WhichOneof("kind") for e in rest]
    assert kinds.index("tool_call_resumed") < kinds.index("run_finished")
    assert "status_changed" in kinds
    run = await client.get_run(handle.run_id)
    assert run.status == SUCCEEDED
    assert run.result.single.output.answer == "approved: {'exit': 0}"
    assert decisions[0].decision_id == "d1"


async def test_denial_by_thread(client: Client, workers: Workers) -> None:
    decisions: list[Decision] = []
    await workers.start({"ops": approver(decisions)})
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "t"), thread_id="th", agent_id="alice")
    await _wait_for_status(client, handle.run_id, WAITING)
    await client.submit_decisions(deny("call-1", "not today"), thread_id="th", agent_id="alice")
    run = await client.wait(handle.run_id)
    assert run.result.single.output.answer == "denied: not today"


async def test_decisions_sent_before_the_suspension_are_delivered_first(client: Client, workers: Workers) -> None:
    decisions: list[Decision] = []
    release = asyncio.Event()

    async def late_suspender(ctx: AgentContext) -> str:
        await release.wait()
        decision = await ctx.suspend_tool_call("call-1", "shell")
        decisions.append(decision)
        return "ok" if decision.approved else "no"

    await workers.start({"ops": late_suspender})
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "t"), agent_id="a")
    response = await client.submit_decisions(resume("call-1", "early"), run_id=handle.run_id, agent_id="a")
    assert list(response.queued_decision_ids) == ["decision_call-1"]
    release.set()
    run = await client.wait(handle.run_id)
    assert run.result.single.output.answer == "ok"
    assert decisions[0].result == "early"
    # initial_decisions on StartRun are queued the same way.
    decisions.clear()
    handle = await client.start_run(
        single(agent("ops", tools=["shell"]), "t"), agent_id="a", initial_decisions=[deny("call-1", "preset")]
    )
    run = await client.wait(handle.run_id)
    assert run.result.single.output.answer == "no" and decisions[0].reason == "preset"


async def test_a_duplicate_decision_is_applied_once(client: Client, workers: Workers) -> None:
    decisions: list[Decision] = []

    async def two_calls(ctx: AgentContext) -> str:
        first = await ctx.suspend_tool_call("call-1", "shell")
        second = await ctx.suspend_tool_call("call-2", "shell", timeout=0.5)
        decisions.extend([first, second])
        return "done"

    await workers.start({"ops": two_calls})
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "t"))
    await _wait_for_status(client, handle.run_id, WAITING)
    first = await client.submit_decisions(resume("call-1", 1, decision_id="same"), run_id=handle.run_id)
    assert list(first.applied_decision_ids) == ["same"]
    again = await client.submit_decisions(resume("call-2", 2, decision_id="same"), run_id=handle.run_id)
    assert list(again.duplicate_decision_ids) == ["same"]
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED
    assert decisions[0].result == 1
    # The duplicate never reached call-2, which timed out and was cancelled.
    assert not decisions[1].approved
    assert decisions[1].reason == "no decision within 0.5s; the tool call was cancelled"


async def test_wrong_owner_is_refused_on_both_paths(client: Client, workers: Workers) -> None:
    await workers.start({"ops": approver([])})
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "t"), thread_id="own", agent_id="alice")
    for run_id, thread_id in ((handle.run_id, ""), ("", "own")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.submit_decisions(resume("call-1"), run_id=run_id, thread_id=thread_id, agent_id="eve")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await client.cancel(handle.run_id, agent_id="alice")


async def test_a_tool_outside_the_spec_cannot_be_suspended(client: Client, workers: Workers) -> None:
    async def sneaky(ctx: AgentContext) -> str:
        try:
            await ctx.suspend_tool_call("c", "launch_missiles")
        except Exception as err:
            return str(err)
        return "suspended?!"

    await workers.start({"ops": sneaky})
    run = await client.run(single(agent("ops", tools=["shell"]), "t"))
    assert "may not use tool 'launch_missiles'" in run.result.single.output.answer


async def test_decision_bad_input(client: Client, workers: Workers) -> None:
    await workers.start({"ops": approver([])})
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "t"), thread_id="bad")

    async def code_and_details(**kwargs: object) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.runs.SubmitDecisions(runs_pb2.SubmitDecisionsRequest(**kwargs))  # type: ignore[arg-type]
        return err.value.code(), err.value.details() or ""

    assert await code_and_details(decisions=[resume("x")]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "run_id: give run_id or thread_id"
    )
    code, details = await code_and_details(run_id=handle.run_id, thread_id="bad", decisions=[resume("x")])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details
    code, details = await code_and_details(run_id="ghost", decisions=[resume("x")])
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("run_id:")
    code, details = await code_and_details(thread_id="ghost-thread", decisions=[resume("x")])
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("thread_id:")
    code, details = await code_and_details(run_id=handle.run_id)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("decisions:")
    code, details = await code_and_details(run_id=handle.run_id, decisions=[types_pb2.ToolCallDecision(target_id="x")])
    assert details.startswith("decisions[0].action:")
    code, details = await code_and_details(run_id=handle.run_id, decisions=[resume("")])
    assert details.startswith("decisions[0].target_id:")
    await client.cancel(handle.run_id, wait=True)
    code, details = await code_and_details(run_id=handle.run_id, decisions=[resume("call-1")])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "has finished" in details


async def test_interrupt_cancels_the_old_run_on_its_worker_first(client: Client, workers: Workers) -> None:
    log: list[str] = []

    async def slow(ctx: AgentContext) -> str:
        log.append(f"start {ctx.task}")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.append(f"cancelled {ctx.task}")
            raise
        return "never"

    async def quick(ctx: AgentContext) -> str:
        log.append(f"start {ctx.task}")
        return "new answer"

    await workers.start({"slow": slow, "quick": quick}, max_in_flight=2)
    old = await client.start_run(single(agent("slow"), "old"), thread_id="t")
    for _ in range(500):
        if log == ["start old"]:
            break
        await asyncio.sleep(0.01)
    new = await client.start_run(single(agent("quick"), "new"), thread_id="t", on_busy="interrupt")
    run = await client.wait(new.run_id)
    assert run.result.single.output.answer == "new answer"
    assert log == ["start old", "cancelled old", "start new"]
    old_run = await client.get_run(old.run_id)
    assert old_run.status == CANCELLED and old_run.termination_detail == f"interrupted by run '{new.run_id}'"


async def test_three_watchers_one_late_see_the_same_ordered_events(client: Client, workers: Workers) -> None:
    await workers.start({"ops": approver([])})
    handle = await client.start_run(single(agent("ops", tools=["shell"]), "t"))

    async def watch(after: int = 0) -> list[int]:
        return [e.seq async for e in client.watch(handle.run_id, after_seq=after)]

    early = [asyncio.create_task(watch()) for _ in range(2)]
    await _wait_for_status(client, handle.run_id, WAITING)
    late = asyncio.create_task(watch(after=2))
    await client.submit_decisions(resume("call-1"), run_id=handle.run_id)
    full_a, full_b, tail = await asyncio.gather(*early, late)
    assert full_a == full_b == list(range(1, len(full_a) + 1))
    assert tail == full_a[2:]


async def test_session_drives_a_run_with_a_decision(client: Client, workers: Workers) -> None:
    await workers.start({"ops": approver([])})
    session = await client.session(single(agent("ops", tools=["shell"]), "t"), agent_id="alice")
    assert session.handle.status == types_pb2.RUN_STATUS_RUNNING
    kinds = []
    async for event in session.events():
        kinds.append(event.WhichOneof("kind"))
        if kinds[-1] == "tool_call_suspended":
            response = await session.decide(resume("call-1", "from the session"))
            assert len(response.applied_decision_ids) == 1
        if kinds[-1] == "run_finished":
            assert event.run_finished.result.single.output.answer == "approved: from the session"
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    await session.close()


async def test_session_cancel_and_refusals(client: Client, workers: Workers) -> None:
    await workers.start({"ops": approver([])})
    session = await client.session(single(agent("ops", tools=["shell"]), "t"), agent_id="alice")
    with pytest.raises(ValueError, match="decisions: must hold at least one decision"):
        await session.decide()
    cancelled = await session.cancel("done here", wait=True)
    assert not cancelled.already_finished
    events = [e async for e in session.events()]
    assert events[-1].run_finished.status == CANCELLED
    await session.close()


async def _wait_for_status(client: Client, run_id: str, status: int) -> None:
    for _ in range(500):
        if (await client.get_run(run_id)).status == status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"run never reached status {status}")


async def test_only_the_owner_may_interrupt_a_run(client: Client, workers: Workers) -> None:
    async def slow(ctx: AgentContext) -> str:
        await asyncio.sleep(30)
        return "never"

    await workers.start({"slow": slow})
    old = await client.start_run(single(agent("slow"), "old"), thread_id="shared", agent_id="alice")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.start_run(single(agent("slow"), "new"), thread_id="shared", agent_id="eve", on_busy="interrupt")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "agent_id" in (refused.value.details() or "") and "alice" in (refused.value.details() or "")
    assert (await client.get_run(old.run_id)).status == types_pb2.RUN_STATUS_RUNNING
    assert len(await client.list_runs(thread_id="shared")) == 1  # the refused run was never recorded
    await client.cancel(old.run_id, agent_id="alice")
