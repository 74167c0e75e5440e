"""Every language's worker gives up at once on a credential the sidecar refuses: the process
exits non-zero with the refusal in its output after one Connect attempt, instead of
reconnecting with backoff forever. The right token is served.

Run with `pytest -m crosslang tests/crosslang` (clients/ci.sh builds the programs first).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from .harness import Process, cluster, program

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(120)]

WORKER_TOKEN = "w-6c1e9b3f0a7d42e8b5f1"
CLIENT_TOKEN = "c-2a8f5d1e7c9b40a3f6e2"
TOKENS = {"CARSVC_WORKER_TOKENS": WORKER_TOKEN, "CARSVC_CLIENT_TOKENS": CLIENT_TOKEN}
CONNECT = "/car.v1.WorkerService/Connect"
NO_TOKEN = f"{CONNECT} needs 'authorization: Bearer <token>' metadata with a worker token"
NOT_A_WORKER_TOKEN = f"the bearer token is not a worker token of this sidecar ({CONNECT} needs one)"
# The status code as each language spells it.
UNAUTHENTICATED = {
    "go": "Unauthenticated", "ts": "UNAUTHENTICATED", "rust": "Unauthenticated", "python": "UNAUTHENTICATED",
}

CASES = [(lang, case) for lang in ("go", "ts", "rust", "python") for case in ("missing", "wrong", "client-token")]


def _token_env(case: str) -> dict[str, str]:
    return {
        "missing": {"CARSVC_WORKER_TOKEN": ""},
        "wrong": {"CARSVC_WORKER_TOKEN": "w-6c1e9b3f0a7d42e8b5f2"},
        "client-token": {"CARSVC_WORKER_TOKEN": CLIENT_TOKEN},
    }[case]


@pytest.mark.parametrize(("lang", "case"), CASES)
def test_a_refused_token_ends_the_worker_at_once(tmp_path: Path, lang: str, case: str) -> None:
    with cluster(tmp_path, TOKENS) as c:
        assert c.sidecar.process is not None
        cmd = [*program(lang, "worker"), "--target", c.sidecar.address, "--worker-id", f"{lang}-refused"]
        started = time.monotonic()
        worker = Process(f"{lang}-refused", cmd, tmp_path / "worker.log", _token_env(case))
        c.processes.append(worker)
        try:
            code = worker.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {lang} worker still runs with a refused token:\n{worker.text()}")
        took = time.monotonic() - started
        output = worker.text()
        assert code != 0, output
        assert took < 5, f"the {lang} worker took {took:.1f}s to give up (process start included):\n{output}"
        details = NO_TOKEN if case == "missing" else NOT_A_WORKER_TOKEN
        assert f"refused the worker's credentials ({UNAUTHENTICATED[lang]}: {details})" in output, output
        assert "ready " not in output
        refusals = re.findall(rf"refused {re.escape(CONNECT)} from ", c.sidecar.process.text())
        assert len(refusals) == 1, f"{len(refusals)} Connect attempts; a refused token must not be retried"
        assert WORKER_TOKEN not in output and CLIENT_TOKEN not in output


@pytest.mark.parametrize("lang", ["go", "ts", "rust", "python"])
def test_the_right_token_is_served(tmp_path: Path, lang: str) -> None:
    with cluster(tmp_path, TOKENS) as c:
        cmd = [*program(lang, "worker"), "--target", c.sidecar.address, "--worker-id", f"{lang}-trusted"]
        worker = Process(f"{lang}-trusted", cmd, tmp_path / "worker.log", {"CARSVC_WORKER_TOKEN": WORKER_TOKEN})
        c.processes.append(worker)
        worker.wait_for(rf"^ready {lang}-trusted ", timeout=30)
        assert c.sidecar.process is not None
        assert f"refused {CONNECT}" not in c.sidecar.process.text()
