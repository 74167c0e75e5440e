"""The Java example (clients/java-example): a worker and a client that Maven generates from
proto/car/v1 alone with protoc and protoc-gen-grpc-java, against a live sidecar, beside the
Python SDK and the Python example worker. What docs/contract.md ("Any other language") says
is checked here: the welcome's heartbeat numbers, the glob a worker matched, progress and
state calls, a cancel and the refusal of the calls that follow it.

Run with `pytest -m crosslang tests/crosslang` (clients/ci.sh builds the jar first with
clients/java-example/build.sh).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from carsvc.client import Client, agent, single

from .harness import CLIENTS, ROOT, Process, cluster, with_client

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(180)]

JAR = CLIENTS / "java-example/target/carsvc-java-example.jar"
ITEMS = ["a.txt", "b.txt", "c.txt"]


def java(*args: str) -> list[str]:
    if not JAR.exists():
        pytest.fail(f"{JAR} is missing: run `bash clients/java-example/build.sh` first")
    return ["java", "-jar", str(JAR), *args]


def mapreduce(address: str, mapper: str, reducer: str) -> dict[str, Any]:
    """The Java client's map-reduce, to its end; its one JSON line."""
    done = subprocess.run(
        java("mapreduce", "--target", address, "--mapper", mapper, "--reducer", reducer,
             "--items", ",".join(ITEMS), "--json"),
        cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_java_worker_and_client_from_the_contract(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        address = c.sidecar.address
        java_worker = Process(
            "java-1",
            java("worker", "--target", address, "--worker-id", "java-1", "--agents", "java-mapper*,java-reducer"),
            tmp_path / "java-1.log",
        )
        c.processes.append(java_worker)
        # The welcome carries the heartbeat interval and how many may be missed (300 ms x 3 here).
        (ready,) = java_worker.wait_for(r"^ready java-1 (\S+) heartbeat 300ms x3 max_in_flight 4$", timeout=30)
        session = ready.group(1)

        # Java client, Java worker: mappers matched by the glob, the reducer by its name.
        result = mapreduce(address, "java-mapper", "java-reducer")
        assert result["status"] == "RUN_STATUS_SUCCEEDED", result
        assert result["map_answers"] == [f"java read {item}" for item in ITEMS]
        assert result["reduced_answer"] == "java reduced 3 answers"
        assert result["workers"] == ["java-1"]
        assert result["events"]["progress"] == 2 * (len(ITEMS) + 1)
        for i in range(len(ITEMS)):
            java_worker.wait_for(
                rf"assigned \S+:map/{i} agent=java-mapper matched=java-mapper\* spec=java-mapper_{i} "
            )
        java_worker.wait_for(r"assigned \S+:reduce agent=java-reducer matched=java-reducer spec=java-reducer ")
        # The deadline is set (from agent_timeout_s, an hour by default), never 0.
        deadlines = [int(s) for s in re.findall(r"deadline_in_s=(-?\d+)", java_worker.text())]
        assert deadlines and all(3500 < s <= 3600 for s in deadlines), deadlines

        # The Java worker's state writes, read back by the Python SDK.
        async def state_of(client: Client) -> dict[str, Any]:
            run = await client.get_run(result["run_id"])
            return {f"java-mapper_{i}": await client.get_state(run.state_scope, f"java/java-mapper_{i}")
                    for i in range(len(ITEMS))}

        assert with_client(address, state_of) == {f"java-mapper_{i}": "java-1" for i in range(len(ITEMS))}

        # Java client, Python example worker.
        c.worker("python", "py-1", "summarizer,combiner")
        result = mapreduce(address, "summarizer", "combiner")
        assert result["status"] == "RUN_STATUS_SUCCEEDED", result
        assert result["map_answers"] == [f"summary({item})" for item in ITEMS]
        assert result["workers"] == ["py-1"]

        # Python client, Java worker: a cancel stops the assignment, and the assignment's
        # calls after it are refused with FAILED_PRECONDITION.
        slow = Process(
            "java-slow",
            java("worker", "--target", address, "--worker-id", "java-slow", "--agents", "java-slow", "--sleep-ms",
                 "60000"),
            tmp_path / "java-slow.log",
        )
        c.processes.append(slow)
        slow.wait_for(r"^ready java-slow ", timeout=30)

        async def start_and_cancel(client: Client) -> Any:
            handle = await client.start_run(single(agent("java-slow"), "Process this item: x"), agent_id="op")
            async for event in client.watch(handle.run_id):
                if event.WhichOneof("kind") == "progress":
                    break
            await client.cancel(handle.run_id, agent_id="op", reason="operator says stop", wait=True)
            return await client.get_run(handle.run_id)

        run = with_client(address, start_and_cancel)
        assert run.termination_reason == "cancelled"
        slow.wait_for(r"^cancelled \S+:single operator says stop$")
        slow.wait_for(
            r"^call after cancel: FAILED_PRECONDITION calls\[0\]\.assignment_id: assignment '\S+:single' is not "
            r"running on this worker session$"
        )

        # Heartbeats kept the first Java worker's session through its idle seconds.
        workers = with_client(address, lambda client: client.list_workers())
        assert session in {w.session_id for w in workers if w.worker_id == "java-1"}
        assert "stream ended" not in java_worker.text()
