"""Runs survive the sidecar: a real sidecar process with --data-dir is SIGKILLed
mid-run and started again on the same data directory; its in-flight runs resume
and finish, steps whose outputs were journaled are not dispatched again, and
every step is accepted exactly once. Workers are real processes that reconnect
by themselves."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from carsvc._proto.car.v1 import events_pb2, types_pb2
from carsvc.backends.redis import keys
from carsvc.client import Client, agent, map_reduce, pipeline, resume, single, supervisor
from carsvc.patterns.answers import answer_lines
from tests.procs import ScriptedWorker, free_port, sidecar_process

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
WAITING = types_pb2.RUN_STATUS_WAITING
# Commit often, so a kill finds most finished steps on disk.
ENV = {"CARSVC_JOURNAL_FLUSH_MS": "20", "CARSVC_UNPLACED_TIMEOUT_S": "30"}


def journaled_steps(store: Path | str, run_id: str) -> set[str]:
    """What the killed sidecar's store holds for the run, read straight from disk or Redis."""
    if isinstance(store, str):
        with redis.Redis.from_url(store) as r:
            return {step.decode() for step in r.hkeys(keys.steps(run_id))}
    with sqlite3.connect(store / "carsvc.sqlite3") as db:
        return {step for (step,) in db.execute("SELECT step FROM steps WHERE run_id = ?", (run_id,))}


@pytest.fixture(params=["journal", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where the sidecar keeps its runs: a data directory (the SQLite journal) or Redis."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    return tmp_path


async def events_until(
    client: Client, run_id: str, enough: int, kind: str = "agent_finished", after_seq: int = 0
) -> None:
    """Returns once `enough` events of `kind` after `after_seq` were seen
    (watchers only see journaled events)."""
    seen = 0
    async for event in client.watch(run_id, after_seq, reconnect_for=0):
        if event.WhichOneof("kind") == kind:
            seen += 1
            if seen >= enough:
                return
    raise AssertionError(f"the run ended after {seen} {kind} events")


async def all_events(client: Client, run_id: str) -> list[events_pb2.RunEvent]:
    return [e async for e in client.watch(run_id)]


def finished_steps(events: list[events_pb2.RunEvent]) -> Counter[str]:
    return Counter(e.agent_finished.step for e in events if e.WhichOneof("kind") == "agent_finished")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
async def workers(port: int) -> AsyncIterator[list[ScriptedWorker]]:
    started: list[ScriptedWorker] = []
    yield started
    for w in started:
        await w.stop()


async def _kill_and_restart(
    port: int, store: Path | str, first: asyncio.subprocess.Process, workers: list[ScriptedWorker]
) -> None:
    """SIGKILLs the sidecar; the workers' next sessions (with the restarted one) are generation 1."""
    first.kill()
    await first.wait()


async def test_a_map_reduce_killed_midway_resumes_without_redoing_journaled_steps(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    items = [f"item-{i}" for i in range(300)]
    async with sidecar_process(port, store, ENV) as first:
        workers.append(
            await ScriptedWorker.spawn(
                address, "--agent", "mapper", "--agent", "reducer", "--sleep", "0.01", "--max-in-flight", "16",
                "--answer", "done",
            )
        )
        async with Client(address) as client:
            handle = await client.start_run(
                map_reduce(agent("mapper"), agent("reducer"), "t", items, max_concurrent=16)
            )
            await events_until(client, handle.run_id, 100)
        await _kill_and_restart(port, store, first, workers)
    before = journaled_steps(store, handle.run_id)
    assert len(before) >= 100
    async with sidecar_process(port, store, ENV), Client(address) as client:
        run = await asyncio.wait_for(client.wait(handle.run_id), 60)
        events = await all_events(client, handle.run_id)
    assert run.status == SUCCEEDED, run.termination_detail
    outputs = run.result.map_reduce.map_outputs
    assert [o.answer.rsplit(": ", 1)[-1].rsplit(" ", 1)[-1] for o in outputs] == items
    redone = {name for generation, name in workers[0].started if generation == 1}
    assert not {f"mapper_{s.split('/')[1]}" for s in before if s.startswith("map/")} & redone
    counts = finished_steps(events)
    assert all(counts[f"map/{i}"] == 1 for i in range(len(items))), counts.most_common(3)
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds.count("run_started") == 1 and kinds[-1] == "run_finished"
    resumed = [e for e in events if e.WhichOneof("kind") == "status_changed" and "resumed" in e.status_changed.reason]
    assert len(resumed) == 1
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))


async def test_a_pipeline_killed_in_stage_2_finishes_without_rerunning_stage_1(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    async with sidecar_process(port, store, ENV) as first:
        workers.append(
            await ScriptedWorker.spawn(address, "--agent", "stage*", "--sleep", "1.0", "--answer", "ok")
        )
        async with Client(address) as client:
            handle = await client.start_run(pipeline([agent("stage1"), agent("stage2"), agent("stage3")], "draft"))
            await events_until(client, handle.run_id, 2, kind="agent_started")
        await _kill_and_restart(port, store, first, workers)
    assert journaled_steps(store, handle.run_id) == {"pipeline/0"}
    async with sidecar_process(port, store, ENV), Client(address) as client:
        run = await asyncio.wait_for(client.wait(handle.run_id), 60)
    assert run.status == SUCCEEDED, run.termination_detail
    assert [name for generation, name in workers[0].started if generation == 1] == ["stage2", "stage3"]
    assert run.result.pipeline.final_answer.startswith("ok from scripted: ")


async def test_a_waiting_run_resumes_waiting_and_a_later_decision_completes_it(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    spec = agent("deployer", tools=["deploy"])
    async with sidecar_process(port, store, ENV) as first:
        workers.append(await ScriptedWorker.spawn(address, "--agent", "deployer", "--suspend", "deploy"))
        async with Client(address) as client:
            handle = await client.start_run(single(spec, "prod"), agent_id="ops")
            while (await client.get_run(handle.run_id)).status != WAITING:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # the WAITING record is committed (flush 20 ms)
        await _kill_and_restart(port, store, first, workers)
    async with sidecar_process(port, store, ENV), Client(address) as client:
        for _ in range(200):
            if (await client.get_run(handle.run_id)).status == WAITING:
                break
            await asyncio.sleep(0.05)
        assert (await client.get_run(handle.run_id)).status == WAITING
        await client.submit_decisions(resume("deployer-call", "go"), run_id=handle.run_id, agent_id="ops")
        run = await asyncio.wait_for(client.wait(handle.run_id), 30)
    assert run.status == SUCCEEDED, run.termination_detail
    assert run.result.single.output.answer == "approved: go"


async def test_a_run_that_opted_out_ends_sidecar_restarted(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    async with sidecar_process(port, store, ENV) as first:
        workers.append(await ScriptedWorker.spawn(address, "--agent", "slow", "--sleep", "30"))
        async with Client(address) as client:
            kept = await client.start_run(single(agent("slow"), "t"))
            opted_out = await client.start_run(single(agent("slow"), "t"), thread_id="other", resume=False)
            await events_until(client, opted_out.run_id, 1, kind="agent_started")
        await _kill_and_restart(port, store, first, workers)
    async with sidecar_process(port, store, ENV), Client(address) as client:
        ended = await client.get_run(opted_out.run_id)
        assert (ended.status, ended.termination_reason) == (types_pb2.RUN_STATUS_FAILED, "sidecar_restarted")
        assert ended.budget.agents_started == 1  # its spend as last reported, not an empty budget
        assert (await client.get_run(kept.run_id)).status == types_pb2.RUN_STATUS_RUNNING
        await client.cancel(kept.run_id)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_2000_item_map_reduce_killed_three_times_converges(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    items = [f"item-{i}" for i in range(2000)]
    handle = None
    for kill in range(4):
        async with sidecar_process(port, store, ENV) as proc:
            if not workers:
                for n in range(2):
                    workers.append(
                        await ScriptedWorker.spawn(
                            address, "--agent", "mapper", "--agent", "reducer", "--sleep", "0.01",
                            "--max-in-flight", "16", "--worker-id", f"w{n}", "--answer", "done",
                        )
                    )
            async with Client(address) as client:
                if handle is None:
                    handle = await client.start_run(
                        map_reduce(agent("mapper"), agent("reducer"), "t", items, max_concurrent=32)
                    )
                if kill == 3:
                    run = await asyncio.wait_for(client.wait(handle.run_id), 300)
                    events = await all_events(client, handle.run_id)
                    break
                last_seq = (await client.get_run(handle.run_id)).last_seq
                await events_until(client, handle.run_id, 300, after_seq=last_seq)
            await _kill_and_restart(port, store, proc, workers)
    assert handle is not None
    assert run.status == SUCCEEDED, run.termination_detail
    assert len(run.result.map_reduce.map_outputs) == len(items)
    counts = finished_steps(events)
    assert all(counts[f"map/{i}"] == 1 for i in range(len(items))), counts.most_common(3)


class CancelSeeingWorker(ScriptedWorker):
    """A ScriptedWorker that also collects the reason of every AssignmentCancel
    it got ("cancelled <assignment_id> <reason>" lines)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.cancels: list[tuple[str, str]] = []
        super().__init__(proc)

    def _line(self, text: str) -> None:
        words = text.split(maxsplit=2)
        if words[:1] == ["cancelled"] and len(words) >= 2:
            self.cancels.append((words[1], words[2].strip() if len(words) > 2 else ""))
        else:
            super()._line(text)


async def test_a_supervisor_killed_in_round_2_finishes_without_rerunning_round_1(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    request = supervisor([agent("writer-a"), agent("writer-b")], agent("editor"), "notes", max_rounds=3)
    async with sidecar_process(port, store, ENV) as first:
        # The editor's review depends on the round its task names: round 1 is sent back, round 2 approved.
        worker = await ScriptedWorker.spawn(
            address, "--agent", "writer*", "--agent", "editor", "--sleep", "1.0", "--max-in-flight", "4",
            "--answer", "draft", "--reply-when", "Round 1 of 3", "NOT APPROVED: add the dates",
            "--reply-when", "Round 2 of 3", "APPROVED",
        )
        workers.append(worker)
        async with Client(address) as client:
            handle = await client.start_run(request)
            # Round 2's workers were dispatched (agent_started 4 of 2 + 1 + 2)...
            await events_until(client, handle.run_id, 4, kind="agent_started")
        # ... and got their assignments: the kill lands while they run.
        while len(worker.started) < 5:
            await asyncio.sleep(0.02)
        await _kill_and_restart(port, store, first, workers)
    assert journaled_steps(store, handle.run_id) == {
        "supervisor/round-1/worker-0", "supervisor/round-1/worker-1", "supervisor/round-1/review"
    }
    async with sidecar_process(port, store, ENV), Client(address) as client:
        run = await asyncio.wait_for(client.wait(handle.run_id), 60)
        events = await all_events(client, handle.run_id)
    assert run.status == SUCCEEDED, run.termination_detail
    # Round 1's workers and review replayed from the journal; only round 2 went to workers again.
    assert sorted(name for generation, name in worker.started if generation == 1) == ["editor", "writer-a", "writer-b"]
    result = run.result.supervisor
    assert (result.approved, result.total_rounds) == (True, 2)
    assert [r.review.answer for r in result.rounds] == ["NOT APPROVED: add the dates", "APPROVED"]
    assert list(result.supervisor_feedback) == ["NOT APPROVED: add the dates", "APPROVED"]
    assert [o.answer for o in result.rounds[0].outputs] == ["draft from scripted: notes"] * 2
    for output in result.rounds[1].outputs:  # revised with round 1's (replayed) answer and feedback
        assert output.answer.startswith("draft from scripted: notes\n\nYour previous answer:\ndraft from scripted")
        assert "Supervisor feedback:\nNOT APPROVED: add the dates" in output.answer
    assert result.final_answer == answer_lines(result.rounds[1].outputs)
    counts = finished_steps(events)
    assert counts == Counter(
        f"supervisor/round-{r}/{s}" for r in (1, 2) for s in ("worker-0", "worker-1", "review")
    ), counts


async def test_a_graceful_stop_parks_resumable_runs_and_cancels_runs_that_opted_out(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    env = {**ENV, "CARSVC_SHUTDOWN_GRACE_S": "0.3"}
    async with sidecar_process(port, store, env) as first:
        worker = await CancelSeeingWorker.spawn(
            address, "--agent", "slow", "--sleep", "2.0", "--max-in-flight", "4", "--answer", "ok"
        )
        assert isinstance(worker, CancelSeeingWorker)
        workers.append(worker)
        async with Client(address) as client:
            kept = await client.start_run(single(agent("slow"), "kept"), thread_id="t")
            queued = await client.start_run(single(agent("slow"), "queued"), thread_id="t", on_busy="enqueue")
            request = client._start_request(single(agent("slow"), "dropped"), thread_id="other")
            request.resume = False
            opted_out = (await client.runs.StartRun(request)).run
            while len(worker.started) < 2:
                await asyncio.sleep(0.02)
        first.terminate()
        assert await asyncio.wait_for(first.wait(), 30) == 0
    kept_cancels = [reason for assignment, reason in worker.cancels if assignment.startswith(kept.run_id)]
    dropped_cancels = [reason for assignment, reason in worker.cancels if assignment.startswith(opted_out.run_id)]
    assert kept_cancels == ["the sidecar is restarting; the run resumes after it"]
    assert dropped_cancels == ["the sidecar is shutting down"]
    async with sidecar_process(port, store, env), Client(address) as client:
        ended = await client.get_run(opted_out.run_id)
        assert (ended.status, ended.termination_reason, ended.termination_detail) == (
            types_pb2.RUN_STATUS_CANCELLED, "cancelled", "the sidecar is shutting down"
        )
        # A run queued behind the parked one stays queued (PENDING) and runs after it.
        run = await asyncio.wait_for(client.wait(kept.run_id), 60)
        after = await asyncio.wait_for(client.wait(queued.run_id), 60)
        events = await all_events(client, kept.run_id)
    assert run.status == SUCCEEDED, run.termination_detail
    assert run.result.single.output.answer == "ok from scripted: kept"
    assert after.status == SUCCEEDED, after.termination_detail
    assert after.result.single.output.answer == "ok from scripted: queued"
    assert after.started_unix_ms >= run.finished_unix_ms
    assert [name for generation, name in worker.started if generation == 1] == ["slow", "slow"]
    reasons = [e.status_changed.reason for e in events if e.WhichOneof("kind") == "status_changed"]
    assert reasons == ["resumed after the sidecar restarted"]
    assert finished_steps(events) == Counter({"single": 1})


async def test_a_graceful_stop_of_a_waiting_run_cancels_its_agent_and_it_resumes_waiting(
    store: Path | str, port: int, workers: list[ScriptedWorker]
) -> None:
    address = f"127.0.0.1:{port}"
    env = {**ENV, "CARSVC_SHUTDOWN_GRACE_S": "0.3"}
    spec = agent("deployer", tools=["deploy"])
    async with sidecar_process(port, store, env) as first:
        worker = await CancelSeeingWorker.spawn(address, "--agent", "deployer", "--suspend", "deploy")
        assert isinstance(worker, CancelSeeingWorker)
        workers.append(worker)
        async with Client(address) as client:
            handle = await client.start_run(single(spec, "prod"), agent_id="ops")
            while (await client.get_run(handle.run_id)).status != WAITING:
                await asyncio.sleep(0.05)
        first.terminate()
        assert await asyncio.wait_for(first.wait(), 30) == 0
    # The agent is cancelled for the restart; it is not handed a decision nobody made.
    assert worker.cancels == [(f"{handle.run_id}:single", "the sidecar is restarting; the run resumes after it")]
    async with sidecar_process(port, store, env), Client(address) as client:
        for _ in range(200):
            if (await client.get_run(handle.run_id)).status == WAITING:
                break
            await asyncio.sleep(0.05)
        assert (await client.get_run(handle.run_id)).status == WAITING
        await client.submit_decisions(resume("deployer-call", "go"), run_id=handle.run_id, agent_id="ops")
        run = await asyncio.wait_for(client.wait(handle.run_id), 30)
        events = await all_events(client, handle.run_id)
    assert run.status == SUCCEEDED, run.termination_detail
    assert run.result.single.output.answer == "approved: go"
    reasons = [e.status_changed.reason for e in events if e.WhichOneof("kind") == "status_changed"]
    assert reasons == [
        "a tool call waits for a decision", "resumed after the sidecar restarted", "a tool call waits for a decision",
        "every tool call has its decision",
    ]
