"""The example map-reduce clients of every language say why a run failed: with --json in
`termination_reason` / `termination_detail`, in text on a `why:` line, and on stderr, with
exit code 1 (here: a reducer no worker serves)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .harness import ROOT, cluster, program

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(240)]

WHY = "no connected worker serves agent 'nobody' (waited 1s)"


@pytest.mark.parametrize("lang", ["go", "ts", "rust", "python"])
def test_a_failed_run_says_why(tmp_path: Path, lang: str) -> None:
    with cluster(tmp_path, {"CARSVC_UNPLACED_TIMEOUT_S": "1"}) as c:
        c.worker("go", "go-mapper", "summarizer")
        out = c.client(lang, "mapreduce", "--items", "2", "--reducer", "nobody")
        assert out["status"] == "RUN_STATUS_FAILED", out
        assert out["termination_reason"] == "agent_failed", out
        assert WHY in out["termination_detail"], out

        cmd = [*program(lang, "mapreduce"), "--target", c.sidecar.address, "--items", "2", "--reducer", "nobody"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 1, done.stderr
        assert "RUN_STATUS_FAILED" in done.stdout and "why: " in done.stdout and WHY in done.stdout, done.stdout
        assert "mapreduce-client: run " in done.stderr and WHY in done.stderr, done.stderr
