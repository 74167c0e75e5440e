"""Go, TypeScript, Rust and Python workers and clients cooperating through one live sidecar.

Every test starts a real sidecar process and real worker/client processes (the example
programs of clients/, built by clients/build.sh). Run with `pytest -m crosslang tests/crosslang`.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from carsvc._proto.car.v1 import state_pb2, types_pb2
from carsvc.client import Client, agent, single, swarm

from .harness import cluster, events_of, with_client

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(240)]

ITEMS = 50


def summaries(n: int) -> list[str]:
    return [f"summary(item-{i})" for i in range(1, n + 1)]


def finished_workers(events: list[Any]) -> dict[str, tuple[str, int]]:
    """agent name -> (worker id, attempt) of its accepted output."""
    return {
        e.agent_finished.output.name: (e.agent_finished.worker_id, e.agent_finished.attempt)
        for e in events
        if e.WhichOneof("kind") == "agent_finished"
    }


def test_map_reduce_go_and_ts_mappers_rust_reducer_go_client(tmp_path: Path) -> None:
    """Scenario 1: 50 mappers spread over a Go and a TypeScript worker, a Rust reducer, a Go client."""
    with cluster(tmp_path) as c:
        c.worker("go", "go-mapper", "summarizer", sleep_ms=100, max_in_flight=4)
        c.worker("ts", "ts-mapper", "summarizer", sleep_ms=100, max_in_flight=4)
        c.worker("rust", "rust-reducer", "combiner")
        out = c.client("go", "mapreduce", "--items", str(ITEMS), "--max-concurrent", "8")

        assert out["status"] == "RUN_STATUS_SUCCEEDED", out
        assert out["answers"] == summaries(ITEMS)
        assert out["errors"] == [""] * ITEMS
        assert out["reduced_answer"] == f"combined {ITEMS}: " + "; ".join(summaries(ITEMS))
        assert out["finished_by"]["combiner"] == "rust-reducer"
        mappers = Counter(w for name, w in out["finished_by"].items() if name.startswith("summarizer_"))
        assert sum(mappers.values()) == ITEMS
        assert set(mappers) == {"go-mapper", "ts-mapper"}, mappers
        assert min(mappers.values()) >= 5, f"mappers were not spread over both workers: {mappers}"

        # The mappers' runtime calls landed: one state key and one custom event per item.
        async def inspect(client: Client) -> tuple[list[Any], dict[str, Any]]:
            run = await client.get_run(out["run_id"])
            keys = await client.state.ListKeys(state_pb2.ListKeysRequest(scope=run.thread_id, prefix="summaries/"))
            values = {k: await client.get_state(run.thread_id, k) for k in keys.keys}
            return await events_of(client, out["run_id"]), values

        events, state = with_client(c.sidecar.address, inspect)
        assert sorted(state) == sorted(f"summaries/item-{i}" for i in range(1, ITEMS + 1))
        assert {v["sdk"] for v in state.values()} == {"go", "ts"}
        custom = [e.custom for e in events if e.WhichOneof("kind") == "custom"]
        assert sorted(e.payload.struct_value.fields["item"].string_value for e in custom) == sorted(
            f"item-{i}" for i in range(1, ITEMS + 1)
        )
        assert {e.kind for e in custom} == {"summarized"}
        assert sum(1 for e in events if e.WhichOneof("kind") == "progress") == ITEMS


def test_ts_client_approves_a_go_workers_suspended_tool_call(tmp_path: Path) -> None:
    """Scenario 2: a TypeScript client sees ToolCallSuspended from a Go worker and approves it."""
    with cluster(tmp_path) as c:
        c.worker("go", "go-deployer", "deployer")
        out = c.client("ts", "approve", "--value", "ship-it-42")
        assert out["status"] == "RUN_STATUS_SUCCEEDED", out
        assert out["answer"] == "approved: ship-it-42"
        assert out["finished_by"] == "go-deployer"
        assert out["suspended"] == [
            {
                "tool_call_id": "deploy-1",
                "tool_name": "deploy",
                "arguments": {"target": "production"},
                "reason": "deploys to production",
            }
        ]
        denied = c.client("ts", "approve", "--deny", "too risky")
        assert denied["status"] == "RUN_STATUS_SUCCEEDED", denied
        assert denied["answer"] == "denied: too risky"


@pytest.mark.parametrize(("victim", "rescuer"), [("go", "ts"), ("ts", "rust"), ("rust", "go")])
def test_killed_worker_assignment_goes_to_another_languages_worker(tmp_path: Path, victim: str, rescuer: str) -> None:
    """Scenario 3: a worker killed mid-assignment; the assignment is re-dispatched to a worker in
    another language, which answers it as attempt 2."""
    with cluster(tmp_path) as c:
        doomed = c.worker(victim, f"{victim}-victim", "summarizer", sleep_ms=600_000, max_in_flight=1)

        async def start(client: Client) -> str:
            handle = await client.start_run(single(agent("summarizer"), "Summarize\n\nProcess this item: precious"))
            return handle.run_id

        run_id = with_client(c.sidecar.address, start)
        doomed.wait_for(r"^started \S+ summarizer 1$")
        c.worker(rescuer, f"{rescuer}-rescuer", "summarizer", max_in_flight=1)
        doomed.kill()

        async def finish(client: Client) -> tuple[Any, list[Any]]:
            run = await client.wait(run_id)
            return run, await events_of(client, run_id)

        run, events = with_client(c.sidecar.address, finish)
        assert run.status == types_pb2.RUN_STATUS_SUCCEEDED, run
        assert run.result.single.output.answer == "summary(precious)"
        assert finished_workers(events) == {"summarizer": (f"{rescuer}-rescuer", 2)}
        redispatched = [e.agent_redispatched for e in events if e.WhichOneof("kind") == "agent_redispatched"]
        assert [(r.previous_worker_id, r.attempt) for r in redispatched] == [(f"{victim}-victim", 2)]


def test_python_sdk_and_other_languages_serve_one_run(tmp_path: Path) -> None:
    """Scenario 4: the Python worker SDK and a TypeScript worker map, a Rust worker reduces,
    a Rust client runs it."""
    with cluster(tmp_path) as c:
        c.worker("python", "py-mapper", "summarizer", sleep_ms=100, max_in_flight=3)
        c.worker("ts", "ts-mapper", "summarizer", sleep_ms=100, max_in_flight=3)
        c.worker("rust", "rust-reducer", "combiner")
        out = c.client("rust", "mapreduce", "--items", "20", "--max-concurrent", "6")
        assert out["status"] == "RUN_STATUS_SUCCEEDED", out
        assert out["answers"] == summaries(20)
        assert out["reduced_answer"] == "combined 20: " + "; ".join(summaries(20))
        assert out["finished_by"]["combiner"] == "rust-reducer"
        mappers = {w for name, w in out["finished_by"].items() if name.startswith("summarizer_")}
        assert mappers == {"py-mapper", "ts-mapper"}


@pytest.mark.parametrize("lang", ["go", "ts", "rust"])
def test_cancel_is_answered_and_frees_the_slot(tmp_path: Path, lang: str) -> None:
    """A cancelled assignment (a suspended tool call) is answered at once: CancelRun(wait) returns
    quickly and the worker's only slot serves the next run (cancel_ack_timeout is 30 s here)."""
    with cluster(tmp_path, {"CARSVC_CANCEL_ACK_TIMEOUT_S": "30"}) as c:
        w = c.worker(lang, f"{lang}-worker", "deployer,summarizer", max_in_flight=1)

        async def scenario(client: Client) -> tuple[float, Any, Any]:
            handle = await client.start_run(single(agent("deployer", tools=["deploy"]), "prod"), agent_id="owner")
            async for event in client.watch(handle.run_id):
                if event.WhichOneof("kind") == "tool_call_suspended":
                    break
            started = time.monotonic()
            await client.cancel(handle.run_id, agent_id="owner", reason="changed my mind", wait=True)
            took = time.monotonic() - started
            cancelled = await client.get_run(handle.run_id)
            after = await client.run(single(agent("summarizer"), "Process this item: next"))
            return took, cancelled, after

        took, cancelled, after = with_client(c.sidecar.address, scenario)
        assert cancelled.status == types_pb2.RUN_STATUS_CANCELLED
        assert took < 10, f"the {lang} worker did not answer the cancel ({took:.1f}s)"
        assert after.status == types_pb2.RUN_STATUS_SUCCEEDED, after
        assert after.result.single.output.answer == "summary(next)"
        w.wait_for(r"^started \S+ summarizer 1$")


def test_workers_reconnect_after_the_sidecar_restarts(tmp_path: Path) -> None:
    """Go, TypeScript, Rust and Python workers stay registered while idle (heartbeats), come back
    after a graceful restart (drain) and after a crash (SIGKILL), and serve runs again."""
    ids = {"go-w", "ts-w", "rust-w", "py-w"}
    with cluster(tmp_path) as c:
        c.worker("go", "go-w", "summarizer")
        c.worker("ts", "ts-w", "summarizer")
        c.worker("python", "py-w", "summarizer")
        c.worker("rust", "rust-w", "combiner")

        async def workers(client: Client) -> set[str]:
            return {w.worker_id for w in await client.list_workers()}

        def wait_for_workers(timeout: float = 30) -> None:
            deadline = time.monotonic() + timeout
            while (seen := with_client(c.sidecar.address, workers)) != ids:
                assert time.monotonic() < deadline, f"workers connected after the restart: {seen}"
                time.sleep(0.3)

        time.sleep(2.0)  # idle for over six heartbeat intervals: heartbeats keep the sessions
        assert with_client(c.sidecar.address, workers) == ids
        for how in (signal.SIGTERM, signal.SIGKILL):
            c.sidecar.stop(how)
            c.sidecar.start()
            wait_for_workers()
            out = c.client("ts", "mapreduce", "--items", "6")
            assert out["status"] == "RUN_STATUS_SUCCEEDED", (how, out)
            assert out["reduced_answer"] == "combined 6: " + "; ".join(summaries(6))
            assert out["finished_by"]["combiner"] == "rust-w"


@pytest.mark.parametrize(("pinger", "ponger"), [("go", "ts"), ("ts", "rust"), ("rust", "python"), ("python", "go")])
def test_mailbox_messages_between_languages(tmp_path: Path, pinger: str, ponger: str) -> None:
    """Two agents of one parallel swarm, served in different languages, talk through the run's
    mailbox: the pinger sends, the ponger receives and replies to the sender the sidecar named."""
    with cluster(tmp_path) as c:
        c.worker(pinger, f"{pinger}-pinger", "pinger")
        c.worker(ponger, f"{ponger}-ponger", "ponger")

        async def scenario(client: Client) -> Any:
            return await client.run(swarm([agent("pinger"), agent("ponger")], "exchange greetings"))

        run = with_client(c.sidecar.address, scenario)
        assert run.status == types_pb2.RUN_STATUS_SUCCEEDED, run
        outputs = {o.name: (o.answer, o.error) for o in run.result.swarm.outputs}
        assert outputs == {
            "pinger": (f"pinger got pong from {ponger}-ponger", ""),
            "ponger": (f"ponger got ping from {pinger}-pinger from pinger", ""),
        }
