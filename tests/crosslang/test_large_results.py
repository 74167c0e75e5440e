"""A run result over the sidecar's max_inline_result_bytes (1 MiB) reaches the Go, TypeScript
and Rust clients whole: GetRun, ListRuns and run_finished leave it out (`result_omitted`), and
each SDK's GetRun / Run reads it with RunService.ReadRunResult (docs/runs.md "Large results").

A Python worker (big_answer_worker.py) maps 8 items with 300 KiB answers each (2.4 MiB of
result), a Go worker reduces; each language's example mapreduce-client runs the map-reduce
twice: watching events then GetRun, and with the SDK's Run (start and wait).

Run with `pytest -m crosslang tests/crosslang` (clients/ci.sh builds the programs first).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from carsvc._proto.car.v1 import runs_pb2
from carsvc.client import Client

from .big_answer_worker import BIG_ANSWER_BYTES, big_answer
from .harness import Process, cluster, with_client

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(180)]

ITEMS = 8
INLINE_LIMIT = 1024 * 1024  # the sidecar's default max_inline_result_bytes
MAP_SUMMARY_BYTES = 300  # what the reducer's task keeps of each answer


@pytest.mark.parametrize("lang", ["go", "ts", "rust"])
def test_client_reads_a_result_too_large_to_travel_inline(tmp_path: Path, lang: str) -> None:
    expected = [big_answer(f"item-{i}") for i in range(1, ITEMS + 1)]
    assert all(len(a.encode()) == BIG_ANSWER_BYTES for a in expected)
    with cluster(tmp_path) as c:
        cmd = [
            sys.executable, str(Path(__file__).with_name("big_answer_worker.py")),
            "--target", c.sidecar.address, "--worker-id", "py-bigmapper",
        ]
        mapper = Process("py-bigmapper", cmd, tmp_path / "py-bigmapper.log")
        c.processes.append(mapper)
        mapper.wait_for(r"^ready py-bigmapper ", timeout=30)
        c.worker("go", "go-reducer", "combiner")

        for mode in ([], ["--run"]):
            out = c.client(
                lang, "mapreduce", "--items", str(ITEMS), "--mapper", "bigmapper", *mode, "--max-concurrent", "8"
            )
            assert out["status"] == "RUN_STATUS_SUCCEEDED", {k: v for k, v in out.items() if k != "answers"}
            # The result did not travel inline: the SDK read it with ReadRunResult.
            assert out["result_omitted"] is True, mode
            assert out["result_bytes"] > ITEMS * BIG_ANSWER_BYTES > 2 * INLINE_LIMIT
            answers = out["answers"]
            assert [len(a.encode()) for a in answers] == [BIG_ANSWER_BYTES] * ITEMS, mode
            assert answers == expected, mode
            assert out["errors"] == [""] * ITEMS
            assert out["reduced_answer"] == f"combined {ITEMS}: " + "; ".join(a[:MAP_SUMMARY_BYTES] for a in expected)
            if not mode:
                assert out["finished_by"]["combiner"] == "go-reducer"
                assert {w for name, w in out["finished_by"].items() if name != "combiner"} == {"py-bigmapper"}

            # The sidecar's own view: GetRun leaves the result out, and its size is the one the client saw.
            async def raw(client: Client, run_id: str = out["run_id"]) -> tuple[bool, int, bool]:
                response = await client.runs.GetRun(runs_pb2.GetRunRequest(run_id=run_id))
                run = response.run
                return run.result_omitted, run.result_bytes, run.HasField("result")

            omitted, size, has_result = with_client(c.sidecar.address, raw)
            assert (omitted, size, has_result) == (True, out["result_bytes"], False)
