"""examples/cluster/run.sh cannot drift: it is run here end to end -- a real
redis-server, three replica processes, a worker given every address, a replica
SIGKILLed mid-run and the worker's replica stopped -- and its story is checked
line by line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.docsnippets import ROOT
from tests.redis_server import REDIS_SERVER

SCRIPT = ROOT / "examples" / "cluster" / "run.sh"


def test_the_cluster_example_runs_and_a_killed_replicas_run_finishes() -> None:
    if not os.path.exists(REDIS_SERVER):
        pytest.fail("the cluster example needs redis-server: apt-get install redis-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSVC_")}
    done = subprocess.run(
        ["bash", str(SCRIPT)], env={**env, "PYTHON": sys.executable, "REDIS_SERVER": REDIS_SERVER},
        capture_output=True, text=True, timeout=90,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    # A graceful stop of a Redis replica can hang (its run-lease task does not end
    # when cancelled); until that is fixed, run.sh SIGKILLs it after 10 s and says so.
    unexpected = [line for line in done.stderr.splitlines() if not re.match(r"run.sh: pid \d+ did not stop", line)]
    assert not unexpected, done.stderr
    replicas = dict(re.findall(r"^replica-(\d): listening on (\S+)", out, re.M))
    assert sorted(replicas) == ["1", "2", "3"], out
    # The worker starts on replica-1 and, once replica-1 stops, moves to replica-3 (replica-2 is dead).
    assert re.findall(r"^worker: connected to (\S+)", out, re.M) == [replicas["1"], replicas["3"]], out
    started = re.findall(r"^client: run (\w+) started on (\S+) \((\d+) items\)", out, re.M)
    assert [(at, items) for _, at, items in started] == [
        (replicas["2"], "12"), (replicas["2"], "60"), (replicas["3"], "12")
    ], out
    succeeded = r"^client: run (\w+) RUN_STATUS_SUCCEEDED: (\d+) map outputs, reduced: '(\d+) summ"
    finished = re.findall(succeeded, out, re.M)
    assert [(run, n, n) for run, _, n in started] == finished, out
    # The second run: its replica was killed, the watch moved on, another replica finished it.
    assert re.search(r"^client: 20 agents done; SIGKILLed the run's replica", out, re.M), out
    assert f"client: watching on {replicas['3']}: resumed" in out, out
    taken = re.findall(r"^replicas: run (\w+): taken over by replica replica-([13])$", out, re.M)
    assert [run[:8] for run, _ in taken] == [started[1][0]], out
    assert out.rstrip().endswith("done: every run succeeded"), out
