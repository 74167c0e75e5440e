"""`--log-format json`: one JSON object per line, with the ids of the run,
assignment and worker a line is about, from a real sidecar process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import pytest

from carsvc.client import Client, agent, map_reduce
from carsvc.logs import formatter, ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def _lines_until(stream: asyncio.StreamReader, wanted: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(stream.readline(), 30)
        assert line, f"the sidecar's log ended before {wanted!r}"
        record: dict[str, Any] = json.loads(line)  # every line must be one JSON object
        seen.append(record)
        if wanted in record["message"]:
            return record


async def test_json_logs_carry_run_assignment_and_worker_ids() -> None:
    sidecar = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", "0", "--log-format", "json",
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )
    worker = None
    try:
        assert sidecar.stderr is not None
        seen: list[dict[str, Any]] = []
        listening = await _lines_until(sidecar.stderr, "listening on", seen)
        assert listening["level"] == "INFO" and listening["logger"] == "carsvc" and "time" in listening
        address = "127.0.0.1:" + listening["message"].rsplit(":", 1)[1]

        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.programs.scripted_worker", address, "--agent", "slow", "--sleep", "30",
            "--worker-id", "doomed", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )
        connected = await _lines_until(sidecar.stderr, "connected as", seen)
        assert connected["worker_id"] == "doomed" and connected["session_id"]

        async with Client(address) as client:
            handle = await client.start_run(map_reduce(agent("slow"), agent("slow"), "t", ["one"]))
            assert worker.stdout is not None
            assert (await asyncio.wait_for(worker.stdout.readline(), 10)).startswith(b"ready")
            assert (await asyncio.wait_for(worker.stdout.readline(), 10)).startswith(b"started ")
            worker.kill()
            lost = await _lines_until(sidecar.stderr, "lost with 1 assignment", seen)
            assert lost["level"] == "WARNING" and lost["worker_id"] == "doomed"
            moved = await _lines_until(sidecar.stderr, "re-dispatched", seen)
            assert moved["run_id"] == handle.run_id
            assert moved["assignment_id"] and moved["worker_id"] == "doomed"
            await client.cancel(handle.run_id, reason="done with the test")
            finished = await _lines_until(sidecar.stderr, handle.run_id, seen)
            assert finished["run_id"] == handle.run_id
    finally:
        for proc in (worker, sidecar):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_text_format_is_the_default_and_unknown_formats_are_refused() -> None:
    record = logging.LogRecord("carsvc.runs", logging.INFO, __file__, 1, "run %s done", ("r1",), None)
    for key, value in ids(run_id="r1", assignment_id="").items():
        setattr(record, key, value)
    assert formatter("text").format(record).endswith("INFO carsvc.runs: run r1 done")
    as_json = json.loads(formatter("json").format(record))
    assert as_json["run_id"] == "r1" and "assignment_id" not in as_json
    with pytest.raises(ValueError, match="log_format must be one of text, json"):
        formatter("yaml")


def test_bad_log_settings_are_refused_with_the_setting_named() -> None:
    from carsvc.config import Settings

    with pytest.raises(ValueError, match="log_format must be 'text' or 'json', not 'yaml'"):
        Settings(log_format="yaml").validate()
    with pytest.raises(ValueError, match="log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not 'LOUD'"):
        Settings.from_env({"CARSVC_LOG_LEVEL": "LOUD"})
