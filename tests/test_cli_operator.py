"""The operator's CLI (docs/cli.md) through the real command, `python -m carsvc ...`, as a
subprocess against a live sidecar process with a worker process: runs list/get/watch/cancel,
approve and deny, workers, state, budget, --json lines, errors as one line, token and TLS
options, and the live view of `runs watch` on a pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carsvc._proto.car.v1 import budget_pb2, budget_pb2_grpc, types_pb2
from carsvc.client import Client, agent, map_reduce, single
from carsvc.security import TLS
from tests.certs import CertificateAuthority
from tests.crosslang.harness import ROOT, Process, Sidecar, free_port

pytestmark = pytest.mark.timeout(120)

# A worker process: `summarizer` reports progress twice and answers; `slow` runs until
# cancelled; `ops` suspends a `shell` tool call and answers with the decision; `broken`
# raises. It prints "ready" once the sidecar welcomed it.
WORKER = """
import asyncio, os, sys
from carsvc.worker import Worker

worker = Worker(sys.argv[1], worker_id="cli-test-worker", max_in_flight=8,
                token=os.environ.get("CARSVC_WORKER_TOKEN") or None)

@worker.agent("summarizer")
async def summarize(ctx):
    ctx.progress("reading", 0.0)
    await asyncio.sleep(0.05)
    ctx.progress("halfway", 0.5)
    await asyncio.sleep(0.05)
    return f"summary of {ctx.task.rsplit(': ', 1)[-1]}"

@worker.agent("slow")
async def slow(ctx):
    ctx.progress("thinking")
    await asyncio.sleep(60)
    return "too late"

@worker.agent("ops")
async def ops(ctx):
    decision = await ctx.suspend_tool_call("call-1", "shell", {"cmd": "rm -rf build"}, reason="deletes files")
    return f"ran: {decision.result}" if decision.approved else f"skipped: {decision.reason}"

@worker.agent("broken")
async def broken(ctx):
    raise RuntimeError("the model is down")

async def main():
    serving = asyncio.create_task(worker.run())
    await worker.connected.wait()
    print("ready", flush=True)
    await serving

asyncio.run(main())
"""


class Live:
    """A sidecar process and the worker process, for a module's tests."""

    def __init__(self, sidecar: Sidecar, worker: Process) -> None:
        self.sidecar = sidecar
        self.worker = worker
        self.address = sidecar.address


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("cli")
    sidecar = Sidecar(tmp)
    sidecar.start()
    worker = Process("worker", [sys.executable, "-c", WORKER, sidecar.address], tmp / "worker.log")
    try:
        worker.wait_for(r"^ready$")
        yield Live(sidecar, worker)
    finally:
        worker.stop()
        sidecar.stop()


def carsvc(
    *args: str, address: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m carsvc ARGS` to its end, stdout not a terminal."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CARSVC_")}
    if address is not None:
        environ["CARSVC_ADDRESS"] = address
    return subprocess.run(
        [sys.executable, "-m", "carsvc", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env={**environ, **(env or {})},
    )


def json_lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def one_line_error(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with `code` and said why in one line on stderr."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("carsvc: "), done.stderr
    return lines[0].removeprefix("carsvc: ")


def client_call(address: str, fn: Any, **client_options: Any) -> Any:
    async def go() -> Any:
        async with Client(address, **client_options) as client:
            return await fn(client)

    return asyncio.run(go())


def start(address: str, pattern: Any, **options: Any) -> str:
    handle = client_call(address, lambda c: c.start_run(pattern, agent_id="alice", **options))
    return str(handle.run_id)


def wait_for_event(address: str, run_id: str, kind: str) -> None:
    async def go(client: Client) -> None:
        async for event in client.watch(run_id):
            if event.WhichOneof("kind") == kind:
                return
        raise AssertionError(f"run {run_id} ended without a {kind} event")

    client_call(address, go)


FILES = ["a.py", "b.py", "c.py"]


def test_workers_lists_the_connected_worker(live: Live) -> None:
    done = carsvc("workers", address=live.address)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:3] == ["WORKER", "SESSION", "AGENTS"]
    assert len(rows) == 1 and rows[0].startswith("cli-test-worker ")
    assert "summarizer,slow,ops,broken" in rows[0] and " 0/8 " in rows[0]
    (worker,) = json_lines(carsvc("workers", "--json", address=live.address))
    assert worker["worker_id"] == "cli-test-worker"
    assert worker["agents"] == ["summarizer", "slow", "ops", "broken"]
    assert worker["max_in_flight"] == 8 and worker["in_flight"] == 0 and worker["draining"] is False


def test_runs_watch_list_and_get(live: Live) -> None:
    run_id = start(live.address, map_reduce(agent("summarizer"), agent("summarizer"), "Summarize", FILES))
    # Not a terminal: one plain line per event, exit 0 for a run that succeeded.
    watched = carsvc("runs", "watch", run_id, address=live.address)
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert lines[0].startswith("#1 run_started map_reduce thread ")
    assert any(re.fullmatch(r"#\d+ progress summarizer_\d 50% halfway", line) for line in lines), lines
    assert any(re.fullmatch(r"#\d+ agent_finished summarizer_0 ok on cli-test-worker: summary of a.py", line)
               for line in lines), lines
    assert re.fullmatch(r"#\d+ run_finished SUCCEEDED completed", lines[-1])
    seqs = [int(line.split()[0][1:]) for line in lines]
    assert seqs == list(range(1, len(lines) + 1))

    # --json: the same events, one RunEvent per line.
    events = json_lines(carsvc("runs", "watch", run_id, "--json", address=live.address))
    assert [int(e["seq"]) for e in events] == seqs
    assert events[-1]["run_finished"]["status"] == "RUN_STATUS_SUCCEEDED"
    # Resuming after a seq replays only what follows.
    after = str(len(seqs) - 2)
    tail = json_lines(carsvc("runs", "watch", run_id, "--json", "--after-seq", after, address=live.address))
    assert [int(e["seq"]) for e in tail] == seqs[-2:]

    listed = carsvc("runs", "list", address=live.address)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == ["RUN", "STATUS", "PATTERN", "THREAD", "OWNER", "CREATED", "REASON"]
    row = next(line for line in listed.stdout.splitlines() if line.startswith(run_id))
    assert row.split()[1:3] == ["succeeded", "map_reduce"] and " alice " in row and row.endswith("completed")
    runs = json_lines(
        carsvc("runs", "list", "--status", "succeeded", "--owner", "alice", "--json", address=live.address)
    )
    assert run_id in [r["run_id"] for r in runs]
    assert {r["status"] for r in runs} == {"RUN_STATUS_SUCCEEDED"}
    assert json_lines(carsvc("runs", "list", "--limit", "1", "--json", address=live.address))[0]["run_id"] != ""

    got = carsvc("runs", "get", run_id, address=live.address)
    assert got.returncode == 0, got.stderr
    assert re.search(rf"^run: +{run_id}$", got.stdout, re.M)
    assert re.search(r"^status: +succeeded$", got.stdout, re.M)
    assert re.search(r"^budget: +agents 4 · tokens 0", got.stdout, re.M)
    assert '"reduced_answer": "summary of ' in got.stdout
    (run,) = json_lines(carsvc("runs", "get", run_id, "--json", address=live.address))
    outputs = run["result"]["map_reduce"]["map_outputs"]
    assert [o["answer"] for o in outputs] == [f"summary of {f}" for f in FILES]
    # By thread: the thread's latest run.
    (by_thread,) = json_lines(carsvc("runs", "get", "--thread", run["thread_id"], "--json", address=live.address))
    assert by_thread["run_id"] == run_id


def test_watch_exits_3_for_a_run_that_failed(live: Live) -> None:
    run_id = start(live.address, single(agent("broken"), "fail"))
    watched = carsvc("runs", "watch", run_id, address=live.address)
    assert watched.returncode == 3, watched.stderr
    assert "agent_finished broken failed on cli-test-worker: RuntimeError: the model is down" in watched.stdout
    assert re.search(r"run_finished FAILED agent_failed", watched.stdout.splitlines()[-1])


def test_watch_on_a_terminal_draws_the_live_view(live: Live) -> None:
    run_id = start(live.address, map_reduce(agent("summarizer"), agent("summarizer"), "Summarize", FILES))
    screen = _on_terminal(["runs", "watch", run_id], live.address)
    assert re.search(rf"run {run_id}  map_reduce  SUCCEEDED  thread \S+  owner alice", screen), screen
    for i, name in enumerate(FILES):
        assert re.search(rf"summarizer_{i} +map/{i} +█{{24}} +done +summary of {re.escape(name)}", screen), screen
    assert re.search(r"summarizer +reduce +█{24} +done", screen), screen
    assert "budget agents 4 · tokens 0 (in 0, out 0) · $0.0000" in screen
    assert screen.rstrip().endswith("SUCCEEDED completed")


def _on_terminal(args: list[str], address: str) -> str:
    """Runs `carsvc ARGS` with a pseudo-terminal as stdout; its output without escapes."""
    controller, terminal = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CARSVC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "carsvc", *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=terminal,
        stderr=subprocess.PIPE, env={**environ, "CARSVC_ADDRESS": address, "TERM": "xterm", "COLUMNS": "120",
                                     "LINES": "40"},
    )
    os.close(terminal)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    text = b"".join(chunks).decode(errors="replace")
    # The last frame rich drew: what follows the last cursor-up sequence, without colours.
    last = re.split(r"\x1b\[\d*A", text)[-1]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", last).replace("\r", "")


def test_approve_and_deny_a_waiting_tool_call(live: Live) -> None:
    approved = start(live.address, single(agent("ops", tools=["shell"]), "tidy up"))
    wait_for_event(live.address, approved, "tool_call_suspended")
    # The owner check: another agent id is refused, in one line.
    refused = carsvc("approve", approved, "call-1", "--agent-id", "mallory", address=live.address)
    assert one_line_error(refused) == (
        f"PERMISSION_DENIED: agent_id: run '{approved}' belongs to agent_id 'alice', not 'mallory'"
    )
    bad = carsvc("approve", approved, "call-1", "--agent-id", "alice", "--result", "{oops", address=live.address)
    assert one_line_error(bad, 2).startswith("--result is not JSON")
    done = carsvc(
        "approve", approved, "call-1", "--result", '{"exit": 0}', address=live.address,
        env={"CARSVC_AGENT_ID": "alice"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"approved call-1 on run {approved}\n"
    run = client_call(live.address, lambda c: c.wait(approved))
    assert run.result.single.output.answer == "ran: {'exit': 0}"
    late = carsvc("approve", approved, "call-1", "--agent-id", "alice", address=live.address)
    assert one_line_error(late) == (
        f"FAILED_PRECONDITION: run_id: run '{approved}' has finished (RUN_STATUS_SUCCEEDED); "
        "no tool call waits for a decision"
    )

    denied = start(live.address, single(agent("ops", tools=["shell"]), "tidy up"))
    wait_for_event(live.address, denied, "tool_call_suspended")
    (answer,) = json_lines(
        carsvc("deny", denied, "call-1", "--reason", "too risky", "--agent-id", "alice", "--json", address=live.address)
    )
    assert answer["applied_decision_ids"] == ["decision_call-1"]
    watched = carsvc("runs", "watch", denied, address=live.address)
    assert "tool_call_resumed call-1 denied: too risky" in watched.stdout
    assert "agent_finished ops ok on cli-test-worker: skipped: too risky" in watched.stdout


def test_cancel_a_run(live: Live) -> None:
    run_id = start(live.address, single(agent("slow"), "think"))
    wait_for_event(live.address, run_id, "progress")
    no_target = carsvc("runs", "cancel", address=live.address)
    assert one_line_error(no_target, 2) == "give a RUN_ID or --thread (one of them)"
    done = carsvc("runs", "cancel", run_id, "--agent-id", "alice", "--reason", "operator says stop", "--wait",
                  address=live.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"run {run_id}: cancelled\n"
    watched = carsvc("runs", "watch", run_id, address=live.address)
    assert watched.returncode == 3
    assert watched.stdout.splitlines()[-1].endswith("run_finished CANCELLED cancelled: operator says stop")
    (again,) = json_lines(carsvc("runs", "cancel", run_id, "--agent-id", "alice", "--json", address=live.address))
    assert again["already_finished"] is True


def test_state_get_set_keys(live: Live) -> None:
    scope = f"cli-{time.monotonic_ns()}"
    assert carsvc("state", "set", scope, "plan", '{"steps": [1, 2], "done": false}', address=live.address).stdout == (
        f"set plan in {scope} (transition 1)\n"
    )
    (written,) = json_lines(carsvc("state", "set", scope, "note", "hello world", "--string", "--json",
                                   address=live.address))
    assert written == {"scope": scope, "key": "note", "index": 2}
    assert one_line_error(carsvc("state", "set", scope, "note", "hello", address=live.address), 2).startswith(
        "VALUE is not JSON"
    )
    assert carsvc("state", "get", scope, "plan", address=live.address).stdout == '{"steps":[1,2],"done":false}\n'
    (got,) = json_lines(carsvc("state", "get", scope, "note", "--json", address=live.address))
    assert got == {"scope": scope, "key": "note", "found": True, "value": "hello world", "writer": "carsvc-cli"}
    missing = carsvc("state", "get", scope, "nope", address=live.address)
    assert one_line_error(missing) == f"key 'nope' is not set in scope '{scope}'" and missing.stdout == ""
    assert client_call(live.address, lambda c: c.get_state(scope, "plan")) == {"steps": [1, 2], "done": False}
    assert carsvc("state", "keys", scope, address=live.address).stdout == "note\nplan\n"
    assert json_lines(carsvc("state", "keys", scope, "--prefix", "pl", "--json", address=live.address)) == [
        {"scope": scope, "key": "plan"}
    ]


def test_budget_get(live: Live) -> None:
    async def create(client: Client) -> str:
        stub = budget_pb2_grpc.BudgetServiceStub(client.channel)
        limits = types_pb2.BudgetLimits(max_agents=5, max_cost_usd=2.0)
        response = await stub.CreateBudget(budget_pb2.CreateBudgetRequest(limits=limits))
        return str(response.budget.budget_id)

    budget_id = client_call(live.address, create)
    run_id = start(live.address, single(agent("summarizer"), "x"), budget_id=budget_id)
    client_call(live.address, lambda c: c.wait(run_id))
    done = carsvc("budget", "get", budget_id, address=live.address)
    assert done.stdout == "agents 1/5 · tokens 0 (in 0, out 0) · $0.0000 of $2.00\n", done.stderr
    (snapshot,) = json_lines(carsvc("budget", "get", budget_id, "--json", address=live.address))
    assert snapshot["budget_id"] == budget_id and snapshot["agents_started"] == 1
    assert snapshot["limits"] == {"max_agents": 5, "max_cost_usd": 2.0}
    (of_run,) = json_lines(carsvc("budget", "get", "--run", run_id, "--json", address=live.address))
    assert of_run["budget_id"] == budget_id
    assert one_line_error(carsvc("budget", "get", "nope", address=live.address)) == (
        "NOT_FOUND: budget_id: no budget 'nope'"
    )


def test_errors_are_one_line_with_the_status_name(live: Live) -> None:
    unknown = carsvc("runs", "get", "no-such-run", address=live.address)
    assert one_line_error(unknown).startswith("NOT_FOUND: run_id: ") and unknown.stdout == ""
    address = f"127.0.0.1:{free_port()}"
    down = carsvc("workers", "--address", address)
    message = one_line_error(down)
    assert message.startswith("UNAVAILABLE: ") and message.endswith(f"(is the sidecar running at {address}?)")
    usage = carsvc("runs", "list", "--status", "sleeping")
    assert usage.returncode == 2 and "'sleeping' is not a run status" in usage.stderr


def test_token_and_tls_options(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    ca_file = ca.write(tmp_path)
    cert_file, key_file = ca.issue("carsvc", server=True).write(tmp_path, "server")
    client_cert, client_key = ca.issue("operator", server=False).write(tmp_path, "client")
    tokens = {"CARSVC_WORKER_TOKENS": "w-0123456789abcdef", "CARSVC_CLIENT_TOKENS": "c-0123456789abcdef"}
    sidecar = Sidecar(tmp_path, {
        **tokens, "CARSVC_TLS_CERT_FILE": cert_file, "CARSVC_TLS_KEY_FILE": key_file,
        "CARSVC_TLS_CLIENT_CA_FILE": ca_file,
    })
    sidecar.start()
    try:
        token_file = tmp_path / "client.token"
        token_file.write_text("# the operator's token\nc-0123456789abcdef\n")
        tls = ["--tls-ca-file", ca_file, "--tls-cert-file", client_cert, "--tls-key-file", client_key]
        ok = carsvc("workers", "--address", sidecar.address, *tls, "--token-file", str(token_file))
        assert ok.returncode == 0, ok.stderr
        by_env = carsvc(
            "runs", "list", *tls, address=sidecar.address, env={"CARSVC_CLIENT_TOKEN": "c-0123456789abcdef"}
        )
        assert by_env.returncode == 0, by_env.stderr
        assert one_line_error(carsvc("workers", *tls, address=sidecar.address)).startswith("UNAUTHENTICATED: ")
        worker_token = carsvc(
            "workers", *tls, address=sidecar.address, env={"CARSVC_CLIENT_TOKEN": "w-0123456789abcdef"}
        )
        assert one_line_error(worker_token).startswith("UNAUTHENTICATED: ")
        plaintext = carsvc("workers", "--token-file", str(token_file), address=sidecar.address)
        assert one_line_error(plaintext).startswith("UNAVAILABLE: ")
        assert one_line_error(carsvc("workers", "--token-file", str(tmp_path / "missing")), 2).startswith(
            "--token-file "
        )
        half = carsvc("workers", "--tls-cert-file", client_cert, address=sidecar.address)
        assert one_line_error(half, 2).startswith("TLS certificate_chain and private_key must be given together")
        assert client_call(
            sidecar.address, lambda c: c.list_workers(), token="c-0123456789abcdef",
            tls=TLS(ca_file, certificate_chain=client_cert, private_key=client_key),
        ) == []
    finally:
        sidecar.stop()
