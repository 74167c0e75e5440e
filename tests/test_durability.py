"""--data-dir: a sidecar killed with SIGKILL and started again recovers state,
finished runs and their events; runs that were active end `sidecar_restarted`;
workers and watchers reconnect by themselves. Under heavy load, what was
acknowledged more than journal_flush_ms before the kill survives it (and with
journal_sync=strict everything acknowledged does); a journal with a row that
cannot be read back still starts."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from carsvc._proto.car.v1 import events_pb2, types_pb2
from carsvc.backends.journal import Journal
from carsvc.client import Client, RunStream, agent, single
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.values import to_value
from carsvc.worker import AgentContext, Worker
from tests.procs import free_port, sidecar_process
from tests.test_journal import poisoned_event


async def test_sigkill_and_restart_recovers_runs_state_and_reconnects(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    worker = Worker(address, worker_id="survivor", reconnect_max_delay=0.2)
    release = asyncio.Event()

    @worker.agent("quick")
    async def quick(ctx: AgentContext) -> str:
        await ctx.state.set("note", {"written_by": ctx.name})
        return "quick answer"

    @worker.agent("slow")
    async def slow(ctx: AgentContext) -> str:
        await release.wait()
        return "slow answer"

    async with sidecar_process(port, tmp_path) as first:
        serving = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 10)
        first_session = worker.session_id
        async with Client(address) as client:
            done = await client.run(single(agent("quick"), "q"), thread_id="t1", agent_id="alice")
            await client.set_state("t1", "from_client", [1, 2, 3])
            active = await client.start_run(single(agent("slow"), "s"), thread_id="t2")
            watcher = asyncio.create_task(_collect(client, active.run_id))
            while (await client.get_run(active.run_id)).last_seq < 3:  # started, budget, agent_started
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # > journal_flush_ms: everything so far is committed
            first.send_signal(signal.SIGKILL)
            await first.wait()

            async with sidecar_process(port, tmp_path):
                await _until_serving(client)
                recovered = await client.get_run(done.run_id)
                assert recovered.status == types_pb2.RUN_STATUS_SUCCEEDED
                assert recovered.result.single.output.answer == "quick answer"
                assert recovered.agent_id == "alice"
                replay = [e.WhichOneof("kind") async for e in client.watch(done.run_id)]
                assert replay[0] == "run_started" and replay[-1] == "run_finished"
                assert await client.get_state("t1", "note") == {"written_by": "quick"}
                assert await client.get_state("t1", "from_client") == [1, 2, 3]
                # The active run resumed (docs/runs.md): its agent went to the reconnected worker again.
                release.set()
                events = await asyncio.wait_for(watcher, 30)  # the watcher came back by itself
                resumed = await client.get_run(active.run_id)
                assert resumed.status == types_pb2.RUN_STATUS_SUCCEEDED, resumed.termination_detail
                assert resumed.result.single.output.answer == "slow answer"
                assert [e.status_changed.reason for e in events if e.HasField("status_changed")] == [
                    "resumed after the sidecar restarted"
                ]
                assert [e.seq for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
                # The worker reconnected on its own and serves new runs.
                await asyncio.wait_for(_until(lambda: worker.session_id != first_session), 10)
                again = await client.run(single(agent("quick"), "q2"), thread_id="t3")
                assert again.result.single.output.answer == "quick answer"
        release.set()
        await worker.stop()
        await asyncio.wait_for(serving, 10)


async def _collect(client: Client, run_id: str) -> list[events_pb2.RunEvent]:
    return [e async for e in client.watch(run_id, reconnect_for=30)]


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.05)


async def test_journal_compacts_state_and_forgets_dropped_runs(tmp_path: Path) -> None:
    settings = Settings(port=0, data_dir=str(tmp_path), finished_run_retention=1, journal_flush_ms=10)
    sidecar = Sidecar(settings)
    await sidecar.start()
    store = sidecar.runs.scope("s")
    for i in range(5):
        store.set("k", to_value(i), "w")
    store.set("gone", to_value("x"), "w")
    store.delete("gone", "w")
    async with Client(sidecar.address) as client:
        for task in ("a", "b"):
            handle = await client.start_run(single(agent("nobody"), task))
            await client.cancel(handle.run_id, wait=True)
    await sidecar.stop(grace=0.1)
    recovered = Journal(tmp_path).load()
    assert {k: v.number_value for k, (v, _) in recovered.state["s"].items()} == {"k": 4}
    assert len(recovered.runs) == 1  # retention 1: the older run was forgotten
    assert recovered.runs[0].status == types_pb2.RUN_STATUS_CANCELLED
    assert recovered.events[recovered.runs[0].run_id][-1].WhichOneof("kind") == "run_finished"
    # Compaction left one row per live key.
    again = Journal(tmp_path).load()
    assert list(again.state["s"]) == ["k"]


# -- SIGKILL under load ----------------------------------------------------------------

FLUSH_MS = 50
# What the test allows on top of journal_flush_ms: the kill signal's delivery and
# the scheduling of a loaded machine (the sidecar, this test's client and worker,
# and other processes share the cores). Loss before the fix reached 244 ms.
SLACK_MS = 50


@dataclass
class Acknowledged:
    """What the sidecar acknowledged, with the (monotonic) time the client saw it."""

    # writer -> [(value, acknowledged at)]: each writer overwrites its own key with 1, 2, 3, ...
    writes: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # run id -> when the client saw it SUCCEEDED
    runs: dict[str, float] = field(default_factory=dict)


async def _write_state(client: Client, writer: str, acked: Acknowledged) -> None:
    log = acked.writes.setdefault(writer, [])
    for i in itertools.count(1):
        await client.set_state("load", writer, i)
        log.append((i, time.monotonic()))


async def _submit_quick(stream: RunStream, lane: int, acked: Acknowledged) -> None:
    for i in itertools.count():
        run_id = f"s{lane}-{i}"
        finished = await stream.run(single(agent("echo"), run_id), run_id=run_id)
        assert finished.status == types_pb2.RUN_STATUS_SUCCEEDED, finished
        acked.runs[run_id] = time.monotonic()


async def _run_quick(client: Client, lane: int, acked: Acknowledged) -> None:
    for i in itertools.count():
        run = await client.run(single(agent("echo"), f"{lane}-{i}"), thread_id=f"lane-{lane}-{i}")
        while run.status != types_pb2.RUN_STATUS_SUCCEEDED:  # the session ended before GetRun showed the end
            assert run.status not in (types_pb2.RUN_STATUS_FAILED, types_pb2.RUN_STATUS_CANCELLED), run
            await asyncio.sleep(0.001)
            run = await client.get_run(run.run_id)
        acked.runs[run.run_id] = time.monotonic()


# What normal mode may lose on a machine the long load saturates (measured worst: 435 ms).
STARVED_MS = 1_000
# Every run the load starts stays retained (before and after the restart), so a
# missing one was lost, not evicted by finished_run_retention.
KEEP_EVERY_RUN = {"CARSVC_FINISHED_RUN_RETENTION": "1000000"}


async def _kill_under_load(tmp_path: Path, sync: str, seconds: float) -> tuple[Acknowledged, float, int]:
    """Loads a sidecar (state writers and runs of a worker answering at once)
    and SIGKILLs it; returns what was acknowledged, the kill's time and the port."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        "CARSVC_JOURNAL_SYNC": sync,
        "CARSVC_JOURNAL_FLUSH_MS": str(FLUSH_MS),
        "CARSVC_LOG_LEVEL": "INFO",
        **KEEP_EVERY_RUN,
    }
    worker = Worker(address, worker_id="echo", max_in_flight=256, reconnect_max_delay=0.2)

    @worker.agent("echo")
    async def echo(ctx: AgentContext) -> str:
        return ctx.task

    acked = Acknowledged()
    first_log: list[str] = []
    async with sidecar_process(port, tmp_path, env, first_log) as first:
        serving = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 10)
        async with Client(address) as client:
            stream = client.run_stream()
            load = [asyncio.create_task(_write_state(client, f"w{n}", acked)) for n in range(32)]
            load += [asyncio.create_task(_run_quick(client, n, acked)) for n in range(4)]
            load += [asyncio.create_task(_submit_quick(stream, n, acked)) for n in range(128)]
            await asyncio.sleep(seconds)
            killed_at = time.monotonic()
            first.send_signal(signal.SIGKILL)
            await first.wait()
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
    await worker.stop()
    await asyncio.wait_for(serving, 10)
    return acked, killed_at, port


async def _check_survivors(tmp_path: Path, sync: str, seconds: float, bound_ms: float) -> None:
    """Everything acknowledged more than `bound_ms` before the kill is there
    after the restart."""
    acked, killed_at, port = await _kill_under_load(tmp_path, sync, seconds)
    assert len(acked.runs) > 100 and sum(len(w) for w in acked.writes.values()) > 50, "no load to speak of"
    due = killed_at - bound_ms / 1000
    restart = {"CARSVC_JOURNAL_SYNC": sync, **KEEP_EVERY_RUN}
    async with sidecar_process(port, tmp_path, restart), Client(f"127.0.0.1:{port}") as client:
        await _until_serving(client)
        lost: list[str] = []
        for writer, log in acked.writes.items():
            kept = await client.get_state("load", writer, 0)
            # Writes of one key are journaled in order: value v survived iff every write <= v did.
            lost += [f"state {writer}={v} acknowledged {(killed_at - at) * 1000:.0f} ms before the kill"
                     for v, at in log if v > kept and at < due]
        present = {run.run_id: run for run in await client.list_runs(page_size=1000)}
        for run_id, at in acked.runs.items():
            run = present.get(run_id)
            if at < due and (run is None or run.status != types_pb2.RUN_STATUS_SUCCEEDED):
                lost.append(f"run {run_id} seen SUCCEEDED {(killed_at - at) * 1000:.0f} ms before the kill")
        assert not lost, f"{len(lost)} acknowledged writes lost ({sync}, bound {bound_ms} ms): {lost[:10]}"


async def _until_serving(client: Client) -> None:
    for _ in range(50):
        try:
            await client.get_state("load", "-")
            return
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)


async def test_sigkill_under_load_loses_nothing_older_than_the_flush_bound(tmp_path: Path) -> None:
    await _check_survivors(tmp_path, "normal", 1.5, FLUSH_MS + SLACK_MS)


async def test_sigkill_under_load_in_strict_mode_loses_nothing_acknowledged(tmp_path: Path) -> None:
    await _check_survivors(tmp_path, "strict", 1.5, 0)


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["normal", "strict"])
@pytest.mark.parametrize("round_", range(5))
async def test_sigkill_under_long_load_keeps_the_bound(tmp_path: Path, sync: str, round_: int) -> None:
    # The load generator, worker and sidecar share the machine's cores for 8 s; the
    # sidecar's journal thread is at times not scheduled for a few hundred ms, which a
    # time bound cannot cover (docs/operations.md): normal mode gets STARVED_MS.
    await _check_survivors(tmp_path, sync, 8.0, 0 if sync == "strict" else STARVED_MS)


# -- a journal row that cannot be read back -------------------------------------------


async def test_a_poisoned_event_in_the_journal_does_not_keep_the_sidecar_down(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    async with sidecar_process(port, tmp_path) as first, Client(address) as client:
        handle = await client.start_run(single(agent("nobody"), "t"), thread_id="poisoned")
        await client.cancel(handle.run_id, wait=True)
        await client.set_state("s", "kept", 1)
        await client.set_state("s", "bad", 2)
        first.send_signal(signal.SIGTERM)  # a graceful stop: everything is committed
        await first.wait()
    # One event nested beyond protobuf's parse limit (what a worker could once
    # send), one state row and one run record that do not decode.
    with sqlite3.connect(tmp_path / "carsvc.sqlite3") as db:
        seqs = [seq for (seq,) in db.execute("SELECT seq FROM events WHERE run_id = ?", (handle.run_id,))]
        assert 1 in seqs and len(seqs) >= 2
        poison = poisoned_event(handle.run_id, 1)
        db.execute("UPDATE events SET event = ? WHERE run_id = ? AND seq = 1", (poison, handle.run_id))
        db.execute("UPDATE state SET value = ? WHERE key = 'bad'", (b"\x0a\xff",))
        db.execute("INSERT INTO runs VALUES ('broken', 0, ?)", (b"\xff\xff\xff",))

    for restart in range(2):  # the mark stays across restarts
        log: list[str] = []
        async with sidecar_process(port, tmp_path, log=log) as again, Client(address) as client:
            run = await client.get_run(handle.run_id)
            assert run.history_incomplete
            assert run.status == types_pb2.RUN_STATUS_CANCELLED
            events = [e async for e in client.watch(handle.run_id)]
            assert [e.seq for e in events] == seqs[1:]  # the rest of the history, ending run_finished
            assert events[-1].WhichOneof("kind") == "run_finished"
            assert await client.get_state("s", "kept") == 1
            assert await client.get_state("s", "bad") is None
            # It serves new runs, and their seqs do not collide with the skipped one.
            fresh = await client.start_run(single(agent("nobody"), "t"), thread_id="fresh")
            await client.cancel(fresh.run_id, wait=True)
            assert not (await client.get_run(fresh.run_id)).history_incomplete
            again.send_signal(signal.SIGTERM)
            await again.wait()
        text = "".join(log)
        assert f"event seq 1 of run '{handle.run_id}'" in text, text
        if restart == 0:
            assert "the record of run 'broken'" in text and "key 'bad'" in text, text
