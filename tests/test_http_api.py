"""The HTTP/JSON API (carsvc/http/, docs/console.md) over real HTTP against a
live sidecar with real workers: every endpoint, the errors gRPC gives for the
same requests, owner checks, client tokens, Server-Sent Events and their
resume, and runs on another replica (Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from carsvc._proto.car.v1 import budget_pb2, budget_pb2_grpc, runs_pb2, types_pb2
from carsvc.cli import main as cli_main
from carsvc.client import Client
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.certs import CertificateAuthority
from tests.conftest import TEST_SETTINGS, Workers
from tests.procs import ROOT, free_port

API = "/api/v1"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(TEST_SETTINGS, console_port=free_port())


@pytest.fixture
async def http(sidecar: Sidecar) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{sidecar.console_port}") as session:
        yield session


def single_run(name: str, task: str = "go", **fields: Any) -> dict[str, Any]:
    return {"single": {"agent": {"spec": {"name": name, "tools": ["shell"]}}, "task": task}, **fields}


async def answer(response: aiohttp.ClientResponse, status: int = 200) -> Any:
    body = await response.json()
    assert response.status == status, body
    return body


async def sse(response: aiohttp.ClientResponse, until: str = "run_finished") -> list[dict[str, Any]]:
    """The messages of an event stream, up to its end or the first event of kind `until`."""
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    found: list[dict[str, Any]] = []
    message: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line:
            field, _, value = line.partition(": ")
            message[field] = value
            continue
        if "data" in message:
            message["json"] = json.loads(message["data"])
            found.append(message)
            if until in message["json"] or message.get("event") == "error":
                break
        message = {}
    return found


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [int(m["id"]) for m in messages if "id" in m]


async def suspender(ctx: AgentContext) -> str:
    decision = await ctx.suspend_tool_call("call-1", "shell", {"cmd": "rm -rf build"}, reason="deletes files")
    return "ran it" if decision.approved else f"skipped: {decision.reason}"


async def until_status(http: aiohttp.ClientSession, run_id: str, status: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            run = (await answer(await http.get(f"{API}/runs/{run_id}")))["run"]
            if run["status"] == f"RUN_STATUS_{status}":
                return dict(run)
            await asyncio.sleep(0.02)


# -- runs -------------------------------------------------------------------------------------


async def test_start_get_list_and_cancel_a_run_with_its_owner(
    http: aiohttp.ClientSession, workers: Workers
) -> None:
    cancelled = asyncio.Event()

    async def waits(ctx: AgentContext) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    await workers.start({"waiter": waits})
    started = await answer(await http.post(f"{API}/runs", json=single_run("waiter", agent_id="alice",
                                                                           labels={"team": "ops"})))
    handle = started["run"]
    assert handle["agent_id"] == "alice" and handle["status"] == "RUN_STATUS_RUNNING"
    run_id = handle["run_id"]
    run = (await answer(await http.get(f"{API}/runs/{run_id}")))["run"]
    assert (run["pattern"], run["labels"], run["thread_id"]) == ("single", {"team": "ops"}, handle["thread_id"])

    listed = await answer(await http.get(f"{API}/runs", params={"status": "RUNNING", "pattern": "single"}))
    assert [r["run_id"] for r in listed["runs"]] == [run_id]
    for params in ({"status": "SUCCEEDED"}, {"pattern": "map_reduce"}, {"agent_id": "bob"}, {"thread_id": "t-x"}):
        assert await answer(await http.get(f"{API}/runs", params=params)) == {}, params

    refused = await answer(await http.post(f"{API}/runs/{run_id}/cancel", json={"agent_id": "bob"}), 403)
    assert refused == {
        "code": "PERMISSION_DENIED",
        "message": f"agent_id: run '{run_id}' belongs to agent_id 'alice', not 'bob'",
        "field": "agent_id",
    }
    done = await answer(await http.post(
        f"{API}/runs/{run_id}/cancel", json={"agent_id": "alice", "reason": "from the test", "wait": True}
    ))
    assert done["run"]["status"] == "RUN_STATUS_CANCELLED" and "already_finished" not in done
    assert cancelled.is_set()
    again = await answer(await http.post(f"{API}/runs/{run_id}/cancel", json={"agent_id": "alice"}))
    assert again["already_finished"] is True
    run = (await answer(await http.get(f"{API}/runs/{run_id}")))["run"]
    assert (run["termination_reason"], run["termination_detail"]) == ("cancelled", "from the test")


async def test_list_runs_is_paged_newest_first(http: aiohttp.ClientSession) -> None:
    started = []
    for i in range(5):  # nobody serves "nobody": the runs stay active
        started.append((await answer(await http.post(f"{API}/runs", json=single_run("nobody", thread_id=f"t{i}"))))
                       ["run"]["run_id"])
    seen: list[str] = []
    token = ""
    while True:
        page = await answer(await http.get(f"{API}/runs", params={"page_size": 2, "page_token": token}))
        seen += [r["run_id"] for r in page["runs"]]
        assert len(page["runs"]) <= 2
        token = page.get("next_page_token", "")
        if not token:
            break
    assert seen == started[::-1]
    one = await answer(await http.get(f"{API}/runs", params={"thread_id": "t3"}))
    assert [r["run_id"] for r in one["runs"]] == [started[3]]


async def test_a_suspended_tool_call_is_approved_over_http_and_the_run_succeeds(
    http: aiohttp.ClientSession, workers: Workers
) -> None:
    await workers.start({"ops": suspender})
    run_id = (await answer(await http.post(f"{API}/runs", json=single_run("ops", agent_id="alice"))))["run"]["run_id"]
    async with http.get(f"{API}/runs/{run_id}/events") as stream:
        messages = await sse(stream, until="tool_call_suspended")
    suspended = messages[-1]["json"]["tool_call_suspended"]
    assert suspended["tool_name"] == "shell" and suspended["arguments"] == {"cmd": "rm -rf build"}
    await until_status(http, run_id, "WAITING")

    decision = {"target_id": "call-1", "decision_id": "d-1", "action": "DECISION_ACTION_RESUME"}
    refused = await answer(await http.post(f"{API}/runs/{run_id}/decisions", json={"decisions": [decision]}), 403)
    assert (refused["code"], refused["field"]) == ("PERMISSION_DENIED", "agent_id")
    decided = await answer(await http.post(
        f"{API}/runs/{run_id}/decisions", json={"agent_id": "alice", "decisions": [decision]}
    ))
    assert decided["applied_decision_ids"] == ["d-1"]
    again = await answer(await http.post(
        f"{API}/runs/{run_id}/decisions", json={"agent_id": "alice", "decisions": [decision]}
    ))
    assert again["duplicate_decision_ids"] == ["d-1"]
    async with http.get(f"{API}/runs/{run_id}/events", params={"after_seq": messages[-1]["id"]}) as stream:
        rest = await sse(stream)
    finished = rest[-1]["json"]["run_finished"]
    assert finished["status"] == "RUN_STATUS_SUCCEEDED"
    assert finished["result"]["single"]["output"]["answer"] == "ran it"
    assert seqs(rest)[0] == int(messages[-1]["id"]) + 1


# -- events as Server-Sent Events -----------------------------------------------------------


async def test_events_resume_after_a_seq_from_the_url_or_last_event_id(
    http: aiohttp.ClientSession, workers: Workers
) -> None:
    async def chatty(ctx: AgentContext) -> str:
        for i in range(5):
            ctx.progress(f"step {i}", i / 5)
        return "done"

    await workers.start({"chatty": chatty})
    run_id = (await answer(await http.post(f"{API}/runs", json=single_run("chatty"))))["run"]["run_id"]
    async with http.get(f"{API}/runs/{run_id}/events") as stream:
        everything = await sse(stream)
    last = seqs(everything)[-1]
    assert seqs(everything) == list(range(1, last + 1)) and stream.headers["Cache-Control"] == "no-cache"
    assert everything[0]["json"]["run_started"]["pattern"] == "single"

    async with http.get(f"{API}/runs/{run_id}/events", params={"after_seq": 3}) as stream:
        assert seqs(await sse(stream)) == list(range(4, last + 1))
    # An EventSource reconnecting sends Last-Event-ID, which wins over the URL's after_seq.
    async with http.get(
        f"{API}/runs/{run_id}/events", params={"after_seq": 1}, headers={"Last-Event-ID": str(last - 2)}
    ) as stream:
        assert seqs(await sse(stream)) == [last - 1, last]
    # Nothing left to send: 204, which stops an EventSource from reconnecting.
    async with http.get(f"{API}/runs/{run_id}/events", headers={"Last-Event-ID": str(last)}) as stream:
        assert stream.status == 204
    async with http.get(f"{API}/runs/{run_id}/events", params={"kinds": "progress,run_finished"}) as stream:
        kinds = [next(iter(set(m["json"]) - {"run_id", "seq", "time_unix_ms"})) for m in await sse(stream)]
    assert kinds == ["progress"] * 5 + ["run_finished"]

    past = await answer(await http.get(f"{API}/runs/{run_id}/events", params={"after_seq": last + 5}), 400)
    assert (past["code"], past["field"]) == ("OUT_OF_RANGE", "after_seq")
    unknown = await answer(await http.get(f"{API}/runs/{run_id}/events", params={"kinds": "nope"}), 400)
    assert unknown == {"code": "INVALID_ARGUMENT", "message": "kinds[0]: unknown event kind 'nope'",
                       "field": "kinds[0]"}
    bad = await answer(await http.get(f"{API}/runs/{run_id}/events", headers={"Last-Event-ID": "x"}), 400)
    assert bad["field"] == "Last-Event-ID"
    missing = await answer(await http.get(f"{API}/runs/nope/events"), 404)
    assert (missing["code"], missing["field"]) == ("NOT_FOUND", "run_id")


async def test_follow_false_reads_an_active_run_up_to_now(http: aiohttp.ClientSession) -> None:
    run_id = (await answer(await http.post(f"{API}/runs", json=single_run("nobody"))))["run"]["run_id"]
    run = await until_status(http, run_id, "RUNNING")
    async with asyncio.timeout(5), http.get(f"{API}/runs/{run_id}/events", params={"follow": "false"}) as stream:
        assert seqs(await sse(stream))[-1] >= int(run["last_seq"])


async def test_a_reader_that_falls_behind_is_told_where_to_resume_and_resumes() -> None:
    settings = dataclasses.replace(TEST_SETTINGS, console_port=free_port(), watcher_buffer=4)
    sidecar = Sidecar(settings)
    await sidecar.start()
    pool = Workers(sidecar.address)
    release = asyncio.Event()

    async def loud(ctx: AgentContext) -> str:
        for i in range(40):  # 40 x 256 KiB: more than the socket buffers hold for a reader that waits
            ctx.emit("chunk", {"i": i, "blob": "x" * 256 * 1024})
            await asyncio.sleep(0)
        await release.wait()
        return "done"

    try:
        await pool.start({"loud": loud})
        async with aiohttp.ClientSession(f"http://127.0.0.1:{sidecar.console_port}") as http:
            run_id = (await answer(await http.post(f"{API}/runs", json=single_run("loud"))))["run"]["run_id"]
            async with http.get(f"{API}/runs/{run_id}/events") as stream:
                await asyncio.sleep(1.0)  # read nothing while the agent emits
                messages = await sse(stream)
            error = messages[-1]
            assert error["event"] == "error"
            body = error["json"]
            resume = body["resume_after_seq"]
            assert body["code"] == "RESOURCE_EXHAUSTED"
            assert f"resume with after_seq={resume}" in body["message"]
            assert seqs(messages) == list(range(1, resume + 1))
            release.set()
            async with http.get(f"{API}/runs/{run_id}/events", headers={"Last-Event-ID": str(resume)}) as stream:
                rest = await sse(stream)
            assert seqs(rest)[0] == resume + 1 and "run_finished" in rest[-1]["json"]
    finally:
        release.set()
        await pool.stop_all()
        await sidecar.stop(grace=0.5)


# -- state, budgets, workers -------------------------------------------------------------------


async def test_state_budgets_and_workers(http: aiohttp.ClientSession, client: Client, workers: Workers) -> None:
    for key in ("a", "b", "c"):
        await client.set_state("scope-1", key, {"n": key}, writer="tester")
    got = await answer(await http.get(f"{API}/state", params={"scope": "scope-1", "key": "b"}))
    assert got == {"found": True, "value": {"n": "b"}, "writer": "tester"}
    assert await answer(await http.get(f"{API}/state", params={"scope": "scope-1", "key": "zz"})) == {}
    first = await answer(await http.get(f"{API}/state/keys", params={"scope": "scope-1", "page_size": 2}))
    assert first == {"keys": ["a", "b"], "next_page_token": "b"}
    rest = await answer(await http.get(f"{API}/state/keys", params={"scope": "scope-1", "page_token": "b"}))
    assert rest == {"keys": ["c"]}
    no_scope = await answer(await http.get(f"{API}/state/keys"), 400)
    assert (no_scope["code"], no_scope["field"]) == ("INVALID_ARGUMENT", "scope")

    budgets = budget_pb2_grpc.BudgetServiceStub(client.channel)
    await budgets.CreateBudget(budget_pb2.CreateBudgetRequest(
        budget_id="team", limits=types_pb2.BudgetLimits(max_agents=3)
    ))
    budget = await answer(await http.get(f"{API}/budgets/team"))
    assert budget == {"budget": {"budget_id": "team", "limits": {"max_agents": 3}}}
    assert (await answer(await http.get(f"{API}/budgets/none"), 404))["field"] == "budget_id"

    assert await answer(await http.get(f"{API}/workers")) == {}
    await workers.start({"ops": suspender}, max_in_flight=3, labels={"zone": "a"})
    listed = (await answer(await http.get(f"{API}/workers")))["workers"]
    assert [(w["agents"], w["max_in_flight"], w["labels"]) for w in listed] == [(["ops"], 3, {"zone": "a"})]


# -- errors: the same as gRPC's ------------------------------------------------------------------


async def test_errors_are_the_grpc_status_name_message_and_field(
    http: aiohttp.ClientSession, client: Client
) -> None:
    cases: list[tuple[Any, Any, int]] = [
        (http.get(f"{API}/runs/unknown"), client.runs.GetRun(runs_pb2.GetRunRequest(run_id="unknown")), 404),
        (http.post(f"{API}/runs", json={"thread_id": "t"}),
         client.runs.StartRun(runs_pb2.StartRunRequest(thread_id="t")), 400),
        (http.get(f"{API}/runs", params={"page_size": 5000}),
         client.runs.ListRuns(runs_pb2.ListRunsRequest(page_size=5000)), 400),
        (http.get(f"{API}/runs", params={"page_token": "x"}),
         client.runs.ListRuns(runs_pb2.ListRunsRequest(page_token="x")), 400),
        (http.post(f"{API}/runs", json=single_run("nobody", on_busy=7)),
         client.runs.StartRun(runs_pb2.StartRunRequest(on_busy=runs_pb2.OnBusy.ValueType(7))), 400),
    ]
    for request, call, status in cases:
        body = await answer(await request, status)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert (body["code"], body["message"]) == (caught.value.code().name, caught.value.details())

    busy = single_run("nobody", thread_id="busy")
    await answer(await http.post(f"{API}/runs", json=busy))
    body = await answer(await http.post(f"{API}/runs", json=busy), 400)
    assert (body["code"], body["field"]) == ("FAILED_PRECONDITION", "thread_id")


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "field"),
    [
        ("post", "/runs", {"data": "{", "headers": JSON}, 400, "INVALID_ARGUMENT", "body"),
        ("post", "/runs", {"data": "[]", "headers": JSON}, 400, "INVALID_ARGUMENT", "body"),
        ("post", "/runs", {"data": "[" * 100_000, "headers": JSON}, 400, "INVALID_ARGUMENT", "body"),
        ("post", "/runs", {"json": {"nope": 1}}, 400, "INVALID_ARGUMENT", "body"),
        ("post", "/runs", {"data": "{}"}, 400, "INVALID_ARGUMENT", "Content-Type"),
        ("post", "/runs/r/cancel", {"json": {"run_id": "other"}}, 400, "INVALID_ARGUMENT", "run_id"),
        ("post", "/runs/r/decisions", {"json": {"thread_id": "t"}}, 400, "INVALID_ARGUMENT", "thread_id"),
        ("post", "/runs/r/decisions", {"json": {"decisions": []}}, 404, "NOT_FOUND", "run_id"),
        ("get", "/runs", {"params": {"status": "BOGUS"}}, 400, "INVALID_ARGUMENT", "status"),
        ("get", "/runs", {"params": {"page_size": "-1"}}, 400, "INVALID_ARGUMENT", "page_size"),
        ("get", "/runs", {"params": {"page_size": "ten"}}, 400, "INVALID_ARGUMENT", "page_size"),
        ("get", "/runs", {"params": {"thread_id": "t" * 300}}, 400, "INVALID_ARGUMENT", "thread_id"),
        ("get", "/runs", {"params": {"colour": "red"}}, 400, "INVALID_ARGUMENT", "colour"),
        ("get", "/runs", {"params": [("status", "RUNNING"), ("status", "FAILED")]}, 400, "INVALID_ARGUMENT",
         "status"),
        ("get", "/runs/" + "r" * 300, {}, 400, "INVALID_ARGUMENT", "run_id"),
        ("get", "/runs/r", {"params": {"x": "1"}}, 400, "INVALID_ARGUMENT", "x"),
        ("get", "/runs/r/events", {"params": {"follow": "maybe"}}, 400, "INVALID_ARGUMENT", "follow"),
        ("get", "/nowhere", {}, 404, "NOT_FOUND", ""),
        ("delete", "/runs", {}, 405, "UNIMPLEMENTED", ""),
    ],
)
async def test_bad_requests_are_json_errors_naming_the_field(
    http: aiohttp.ClientSession, method: str, path: str, kwargs: dict[str, Any], status: int, code: str, field: str
) -> None:
    body = await answer(await http.request(method, API + path, **kwargs), status)
    assert (body["code"], body["field"]) == (code, field), body


async def test_a_body_over_max_message_bytes_is_refused() -> None:
    settings = dataclasses.replace(
        TEST_SETTINGS, console_port=free_port(), max_message_bytes=64 * 1024, max_field_bytes=32 * 1024
    )
    sidecar = Sidecar(settings)
    await sidecar.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{sidecar.console_port}") as http:
            body = await answer(await http.post(f"{API}/runs", json=single_run("a", task="x" * 100_000)), 413)
            assert (body["code"], body["field"]) == ("RESOURCE_EXHAUSTED", "body")
            field = await answer(await http.post(f"{API}/runs", json=single_run("a", task="x" * 40_000)), 400)
            assert field["field"] == "single.task"
    finally:
        await sidecar.stop(grace=0.5)


# -- who may call -----------------------------------------------------------------------------


async def test_client_tokens_guard_the_api_but_not_the_console_files() -> None:
    settings = dataclasses.replace(
        TEST_SETTINGS, console_port=free_port(), worker_tokens="w-token-0123456789", client_tokens="c-token-0123456789"
    )
    sidecar = Sidecar(settings)
    await sidecar.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{sidecar.console_port}") as http:
            for headers in ({}, {"Authorization": "Bearer w-token-0123456789"}, {"Authorization": "Basic abc"}):
                async with http.get(f"{API}/runs", headers=headers) as refused:
                    body = await answer(refused, 401)
                    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="carsvc"'
                assert body["code"] == "UNAUTHENTICATED" and "client token" in body["message"]
            good = {"Authorization": "bearer c-token-0123456789"}
            assert await answer(await http.get(f"{API}/runs", headers=good)) == {}
            run_id = (await answer(await http.post(f"{API}/runs", json=single_run("n"), headers=good)))["run"]["run_id"]
            async with http.get(f"{API}/runs/{run_id}/events", headers=good, params={"follow": "false"}) as stream:
                assert seqs(await sse(stream))[0] == 1
            async with http.get("/") as page:
                assert page.status == 200 and "carsvc console" in await page.text()
    finally:
        await sidecar.stop(grace=0.5)


async def test_requests_from_other_sites_and_other_host_names_are_refused(http: aiohttp.ClientSession) -> None:
    port = http._base_url.port if http._base_url else 0
    rebinding = await answer(await http.get(f"{API}/runs", headers={"Host": f"attacker.example:{port}"}), 403)
    assert (rebinding["code"], rebinding["field"]) == ("PERMISSION_DENIED", "Host")
    cross = await answer(await http.post(
        f"{API}/runs", json=single_run("n"), headers={"Origin": "http://attacker.example"}
    ), 403)
    assert (cross["code"], cross["field"]) == ("PERMISSION_DENIED", "Origin")
    same = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
    assert (await http.get(f"{API}/runs", headers=same)).status == 200


async def test_the_console_is_https_with_the_grpc_ports_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    settings = dataclasses.replace(TEST_SETTINGS, console_port=free_port(), tls_cert_file=cert, tls_key_file=key)
    sidecar = Sidecar(settings)
    await sidecar.start()
    try:
        trust = ssl.create_default_context(cafile=ca.write(tmp_path))
        async with aiohttp.ClientSession() as http:
            url = f"https://localhost:{sidecar.console_port}{API}/workers"
            assert await answer(await http.get(url, ssl=trust)) == {}
    finally:
        await sidecar.stop(grace=0.5)


# -- the console's files ------------------------------------------------------------------------


async def test_the_console_files_are_served_with_their_types_and_a_strict_policy(
    http: aiohttp.ClientSession,
) -> None:
    async with http.get("/") as page:
        assert page.content_type == "text/html"
        assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'self' covers it
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Content-Type-Options"] == "nosniff"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        async with http.get(f"/assets/{name}") as asset:
            assert (asset.status, asset.content_type) == (200, kind)
    assert (await http.get("/assets/../server.py")).status == 404
    assert (await http.get("/assets/nope.js")).status == 404


def test_console_flags_are_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "--json", "--console-port", "8080", "--console-host", "0.0.0.0"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["console_port"] == {"value": 8080, "source": "command line", "env": "CARSVC_CONSOLE_PORT"}
    assert shown["console_host"]["value"] == "0.0.0.0"
    assert cli_main(["config", "--console-port", "70000"]) == 2


async def test_a_console_port_in_use_stops_the_sidecar_with_a_message() -> None:
    port = free_port()
    first = Sidecar(dataclasses.replace(TEST_SETTINGS, console_port=port))
    await first.start()
    try:
        second = Sidecar(dataclasses.replace(TEST_SETTINGS, console_port=port))
        with pytest.raises(OSError, match=f"could not serve the console on 127.0.0.1:{port}"):
            await second.start()
        await second.stop()
    finally:
        await first.stop(grace=0.5)


# -- runs on another replica -------------------------------------------------------------------


async def test_another_replicas_run_is_read_watched_decided_and_cancelled_over_http(redis_url: str) -> None:
    replicas = [
        Sidecar(dataclasses.replace(TEST_SETTINGS, backend=redis_url, console_port=free_port())) for _ in range(2)
    ]
    for replica in replicas:
        await replica.start()
    a, b = replicas
    pool = Workers(b.address)
    try:
        await pool.start({"ops": suspender})
        async with aiohttp.ClientSession() as http:
            on_a = f"http://127.0.0.1:{a.console_port}{API}"
            on_b = f"http://127.0.0.1:{b.console_port}{API}"
            run_id = (await answer(await http.post(f"{on_b}/runs", json=single_run("ops", agent_id="alice"))))[
                "run"]["run_id"]
            assert run_id in b.runs.runs and run_id not in a.runs.runs
            async with http.get(f"{on_a}/runs/{run_id}/events") as stream:  # read from Redis
                first = await sse(stream, until="tool_call_suspended")
            assert first[-1]["json"]["tool_call_suspended"]["tool_call_id"] == "call-1"
            async with asyncio.timeout(10):
                while (await answer(await http.get(f"{on_a}/runs/{run_id}")))["run"]["status"] != "RUN_STATUS_WAITING":
                    await asyncio.sleep(0.05)
            listed = await answer(await http.get(f"{on_a}/runs", params={"status": "WAITING"}))
            assert [r["run_id"] for r in listed["runs"]] == [run_id]

            decision = {"target_id": "call-1", "action": "DECISION_ACTION_CANCEL", "reason": "no"}
            refused = await answer(await http.post(f"{on_a}/runs/{run_id}/decisions",
                                                   json={"agent_id": "bob", "decisions": [decision]}), 403)
            assert refused["field"] == "agent_id"
            decided = await answer(await http.post(f"{on_a}/runs/{run_id}/decisions",
                                                   json={"agent_id": "alice", "decisions": [decision]}))
            assert decided["applied_decision_ids"] == ["decision_call-1"]
            async with http.get(f"{on_a}/runs/{run_id}/events", headers={"Last-Event-ID": first[-1]["id"]}) as stream:
                rest = await sse(stream)
            finished = rest[-1]["json"]["run_finished"]
            assert finished["result"]["single"]["output"]["answer"] == "skipped: no"
            async with http.get(f"{on_a}/runs/{run_id}/events", headers={"Last-Event-ID": rest[-1]["id"]}) as stream:
                assert stream.status == 204

            other = (await answer(await http.post(f"{on_b}/runs", json=single_run("ops", agent_id="alice"))))[
                "run"]["run_id"]
            cancelled = await answer(await http.post(f"{on_a}/runs/{other}/cancel",
                                                     json={"agent_id": "alice", "wait": True}))
            assert cancelled["run"]["status"] == "RUN_STATUS_CANCELLED"
    finally:
        await pool.stop_all()
        for replica in replicas:
            await replica.stop(grace=0.5)


def test_a_non_editable_install_ships_the_console_files() -> None:
    """pyproject's package data takes carsvc/http/static/ whole (a wheel built from
    it holds every file listed here), and nothing there is excluded."""
    setuptools = tomllib.loads(Path(ROOT, "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "http/static/*" in setuptools["package-data"]["carsvc"]
    excluded = [pattern for key, patterns in setuptools["exclude-package-data"].items()
                if key in ("*", "carsvc", "carsvc.http") for pattern in patterns]
    static = sorted(p.name for p in Path(ROOT, "carsvc", "http", "static").iterdir())
    assert {"index.html", "app.js", "style.css"} <= set(static)
    assert not [name for name in static for pattern in excluded if Path(name).match(pattern)], excluded
