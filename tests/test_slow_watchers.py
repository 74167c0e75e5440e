"""Watchers that do not read cost the sidecar a bounded amount of memory and are
ended RESOURCE_EXHAUSTED with the seq (or state index) to resume from; resuming
from it gets the rest with no gap and no duplicate. Every message fits a
client's default 4 MiB receive limit."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from carsvc._proto.car.v1 import (
    events_pb2,
    events_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    types_pb2,
)
from carsvc.client import Client, agent, map_reduce, single
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.values import to_value
from carsvc.worker import AgentContext, Worker
from tests.conftest import TEST_SETTINGS, Workers
from tests.procs import free_port, sidecar_process

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
RESUME = "carsvc-resume-after-seq"
# No BDP probing: a stalled stream's receive window stays at 64 KiB.
NO_BDP = [("grpc.http2.bdp_probe", 0)]


def _trailer(err: grpc.aio.AioRpcError, key: str) -> str:
    for k, value in err.trailing_metadata() or ():
        if k == key:
            return str(value)
    raise AssertionError(f"no {key} in the trailing metadata of {err}")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _chatty(ctx: AgentContext) -> str:
    ctx.emit("blob", "x" * 2048)
    return "ok"


async def _echo(ctx: AgentContext) -> str:
    return ctx.task


async def _stalled_watchers_scenario(tmp_path: Path, watchers: int, items: int, max_growth_mib: float) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {"CARSVC_WATCHER_MAX_BYTES": str(256 * 1024), "CARSVC_MAX_WATCHERS_PER_RUN": str(watchers + 10)}
    worker = Worker(address, worker_id="chatty", max_in_flight=64)
    worker.add_agent("m", _chatty)
    worker.add_agent("r", _echo)
    async with sidecar_process(port, tmp_path, env) as proc:
        serving: asyncio.Task[None] | None = None
        try:
            async with Client(address) as client, grpc.aio.insecure_channel(address, options=NO_BDP) as stalled_channel:
                await client.list_workers()  # the sidecar is up
                before = _rss_mib(proc.pid)
                # The run waits for its worker while the watchers join.
                handle = await client.start_run(
                    map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(items)], max_concurrent=64)
                )
                stub = runs_pb2_grpc.RunServiceStub(stalled_channel)
                calls = [stub.WatchRun(runs_pb2.WatchRunRequest(run_id=handle.run_id)) for _ in range(watchers)]
                await asyncio.gather(*(call.initial_metadata() for call in calls))
                serving = asyncio.create_task(worker.run())
                # Nobody reads the watchers; the run goes on regardless.
                run = await client.wait(handle.run_id)
                assert run.status == SUCCEEDED
                await asyncio.sleep(0.5)
                grown = _rss_mib(proc.pid) - before
                assert grown < max_growth_mib, f"{watchers} stalled watchers grew the sidecar by {grown:.0f} MiB"
                final = run.last_seq
                for call in calls:
                    received: list[int] = []
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for batch in call:
                            received += [e.seq for e in batch.events]
                    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    resume = _trailer(err.value, RESUME)
                    assert int(resume) == received[-1], "the resume seq is the last one the watcher received"
                    assert f"resume with after_seq={resume}" in (err.value.details() or "")
                    assert received == list(range(1, received[-1] + 1))
                    assert received[-1] < final
                # Resuming from the seq it was told gets the rest: no gap, no duplicate.
                rest = [e.seq async for e in client.watch(handle.run_id, after_seq=int(resume))]
                assert rest == list(range(int(resume) + 1, final + 1))
        finally:
            await worker.stop()
            if serving is not None:
                await asyncio.wait_for(serving, 10)


async def test_stalled_watchers_are_ended_with_a_resume_seq_and_cost_bounded_memory(tmp_path: Path) -> None:
    await _stalled_watchers_scenario(tmp_path, watchers=40, items=300, max_growth_mib=60)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_thousand_stalled_watchers_on_a_long_run(tmp_path: Path) -> None:
    await _stalled_watchers_scenario(tmp_path, watchers=1000, items=2000, max_growth_mib=200)


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(watcher_max_bytes=64 * 1024)])
async def test_client_watch_resumes_by_itself_when_it_reads_too_slowly(
    settings: Settings, sidecar: Sidecar, workers: Workers
) -> None:
    await workers.start({"m": _chatty, "r": _echo}, max_in_flight=32)
    async with Client(sidecar.address, options=NO_BDP) as slow:
        handle = await slow.start_run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(300)]))
        seen: list[int] = []
        async for event in slow.watch(handle.run_id):
            if not seen:  # fall far behind before reading on
                while (await slow.get_run(handle.run_id)).status != SUCCEEDED:
                    await asyncio.sleep(0.02)
            seen.append(event.seq)
        run = await slow.get_run(handle.run_id)
        assert seen == list(range(1, run.last_seq + 1))
        # A watch that resumes past the run's last event gets a clear status.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in slow.watch(handle.run_id, after_seq=run.last_seq + 5):
                pass
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert f"(seq {run.last_seq})" in (err.value.details() or "") and "after_seq" in (err.value.details() or "")


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(watcher_max_bytes=64 * 1024)])
async def test_a_stalled_state_watcher_is_ended_with_the_index_to_resume_from(
    settings: Settings, sidecar: Sidecar, client: Client
) -> None:
    async with grpc.aio.insecure_channel(sidecar.address, options=NO_BDP) as channel:
        stub = state_pb2_grpc.StateServiceStub(channel)
        call = stub.Watch(state_pb2.WatchRequest(scope="s"))
        await call.initial_metadata()
        for i in range(100):
            await client.set_state("s", f"k{i % 7}", "v" * 4096 + str(i))
        received: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for response in call:
                received += [t.index for t in response.transitions]
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        resume = int(_trailer(err.value, "carsvc-resume-after-index"))
        assert received == list(range(1, resume + 1)) and resume < 100
        assert f"resume with after_index={resume}" in (err.value.details() or "")
        rest = stub.Watch(state_pb2.WatchRequest(scope="s", after_index=resume))
        got: list[int] = []
        async for response in rest:
            got += [t.index for t in response.transitions]
            if got and got[-1] == 100:
                break
        rest.cancel()
        assert got == list(range(resume + 1, 101))


async def test_large_event_logs_arrive_in_messages_a_default_client_accepts(
    sidecar: Sidecar, workers: Workers
) -> None:
    async def big(ctx: AgentContext) -> str:
        for _ in range(8):
            ctx.emit("big", "y" * 700_000)
        return "done"

    await workers.start({"big": big})
    async with Client(sidecar.address) as client:  # default channel: 4 MiB per message
        run = await client.run(single(agent("big"), "t"))
        assert run.status == SUCCEEDED, run.termination_detail
        stub = events_pb2_grpc.EventServiceStub(client.channel)
        read = stub.ReadEvents(events_pb2.ReadEventsRequest(run_id=run.run_id))
        everything = [e async for r in read for e in r.events]
        assert [e.seq for e in everything] == list(range(1, run.last_seq + 1))
        customs = stub.ReadEvents(events_pb2.ReadEventsRequest(run_id=run.run_id, kinds=["custom"], follow=True))
        kinds = [e.WhichOneof("kind") async for r in customs for e in r.events]
        assert kinds == ["custom"] * 8
        watched = [e.seq async for e in client.watch(run.run_id)]
        assert watched == list(range(1, run.last_seq + 1))


def test_watcher_max_bytes_is_a_setting() -> None:
    assert Settings.from_env({"CARSVC_WATCHER_MAX_BYTES": "1000"}).watcher_max_bytes == 1000
    with pytest.raises(ValueError, match="watcher_max_bytes"):
        Settings(watcher_max_bytes=0).validate()


async def test_state_values_reach_a_watcher_as_written(sidecar: Sidecar, client: Client) -> None:
    call = client.state.Watch(state_pb2.WatchRequest(scope="w", key_prefix="a"))
    await call.initial_metadata()
    await client.set_state("w", "a1", {"n": 1})
    await client.set_state("w", "b1", 2)
    await client.set_state("w", "a2", [3])
    got = []
    async for response in call:
        got += [(t.key, t.new_value) for t in response.transitions]
        if len(got) == 2:
            break
    call.cancel()
    assert got == [("a1", to_value({"n": 1})), ("a2", to_value([3]))]



# -- with a journal: a watcher never holds a seq a restart can reuse -------------------------


async def test_watchers_only_see_journaled_events_so_a_restart_never_reuses_their_seqs(tmp_path: Path) -> None:
    """A journal that commits rarely (2 s) makes the window wide: without the
    barrier, the watcher would see events a SIGKILL loses, and the restarted run's
    run_finished would take a seq it already had."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The run must end at the restart (not resume) for its run_finished to be checked.
    env = {"CARSVC_JOURNAL_FLUSH_MS": "2000", "CARSVC_RESUME_RUNS": "false"}
    worker = Worker(address, worker_id="ticker", max_in_flight=4, reconnect_max_delay=0.2)

    @worker.agent("ticker")
    async def ticker(ctx: AgentContext) -> str:
        for i in range(100_000):
            ctx.progress(f"tick {i}", 0.0)
            await asyncio.sleep(0.005)
        return "never"

    seen: list[events_pb2.RunEvent] = []
    async with Client(address) as client:
        async with sidecar_process(port, tmp_path, env) as first:
            serving = asyncio.create_task(worker.run())
            await asyncio.wait_for(worker.connected.wait(), 10)
            handle = await client.start_run(single(agent("ticker"), "tick"))

            async def watch() -> None:
                async for event in client.watch(handle.run_id):
                    seen.append(event)

            watching = asyncio.create_task(watch())
            while len(seen) < 30:
                await asyncio.sleep(0.01)
            first.send_signal(signal.SIGKILL)
            await first.wait()
        async with sidecar_process(port, tmp_path, env):
            await asyncio.wait_for(watching, 30)  # the watch resumed by itself and ended
            run = await client.get_run(handle.run_id)
            assert run.termination_reason == "sidecar_restarted"
            seqs = [e.seq for e in seen]
            assert seqs == list(range(1, len(seqs) + 1)), "no gap, no duplicate across the restart"
            assert seen[-1].WhichOneof("kind") == "run_finished" and seen[-1].seq == run.last_seq
            # What the watcher saw before the kill is what the journal kept, seq for seq.
            stub = events_pb2_grpc.EventServiceStub(client.channel)
            read = stub.ReadEvents(events_pb2.ReadEventsRequest(run_id=handle.run_id))
            kept = [e async for r in read for e in r.events]
            assert [e.SerializeToString() for e in kept] == [e.SerializeToString() for e in seen]
            # Resuming past the run's end is a clear status, not a watch that ends quietly.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.watch(handle.run_id, after_seq=run.last_seq + 40):
                    pass
            assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert f"{run.last_seq + 40} is past the last event" in (err.value.details() or "")
            await worker.stop()
            await asyncio.wait_for(serving, 10)
