"""Strangers and broken peers (issue 12, section 6), against real sidecars: what
an unauthenticated caller can make the sidecar hold, streams that stall
mid-message, logs a caller can bloat, metrics over HTTPS, runs started during a
drain, and the Python SDK's reconnect cap. Memory is read from /proc of a
sidecar subprocess; nothing here times anything."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from carsvc._proto.car.v1 import runs_pb2, worker_pb2, worker_pb2_grpc
from carsvc.client import Client, agent, single
from carsvc.config import Settings
from carsvc.logs import CutValues, Repeats
from carsvc.security.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, Worker
from tests.certs import CertificateAuthority
from tests.conftest import TEST_SETTINGS, Workers
from tests.h2peer import RawPeer, grpc_frame, truncated_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
WORKER_TOKEN = "w-3f0d8a2b6c1e94d7a5b0"
CLIENT_TOKEN = "c-9a4e7b1d2c6f08e3b5a7"
AUTH_ENV = {"CARSVC_WORKER_TOKENS": WORKER_TOKEN, "CARSVC_CLIENT_TOKENS": CLIENT_TOKEN}
START_RUN = "/car.v1.RunService/StartRun"
CONNECT = "/car.v1.WorkerService/Connect"
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of process `pid`, in MiB."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) / 1024
    return found


@dataclass
class SidecarProcess:
    """`carsvc serve` as a child process; its stderr lines are collected."""

    proc: asyncio.subprocess.Process
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_for_line(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"the sidecar never logged {text!r}; last lines: {self.lines[-5:]}")


@contextlib.asynccontextmanager
async def sidecar_process(
    *args: str, port: int = 0, env: dict[str, str] | None = None
) -> AsyncIterator[SidecarProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", str(port), *args,
        cwd=ROOT, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )
    child = SidecarProcess(proc, port)

    async def collect() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            child.lines.append(line.decode(errors="replace").rstrip("\n"))

    collector = asyncio.create_task(collect())
    try:
        listening = await child.wait_for_line("listening on")
        child.port = int(listening.rsplit(":", 1)[1])
        yield child
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await collector


async def _unary_code(address: str, method: str, payload: bytes) -> grpc.StatusCode:
    options = channel_options(max_message_bytes=64 * MiB)
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(method)
        try:
            await call(payload, timeout=60)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def _stream_code(address: str, method: str, payload: bytes) -> grpc.StatusCode:
    options = channel_options(max_message_bytes=64 * MiB)
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.stream_stream(method)
        try:
            async for _ in call(iter([payload]), timeout=60):
                pass
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


# -- 1. what an unauthenticated caller can make the sidecar hold ------------------------------


Codes = list[grpc.StatusCode]


async def _unauthenticated_flood(unary: int, streams: int) -> tuple[float, Codes, Codes]:
    """Peak memory growth (MiB) of a sidecar with auth on while `unary` 15 MiB
    StartRun calls and `streams` Connect streams with a 15 MiB first message,
    none with a token, all run at once; and the codes they got."""
    payload = os.urandom(1024) * (15 * 1024)
    async with sidecar_process(env=AUTH_ENV) as sidecar:
        before = memory_mib(sidecar.proc.pid)["VmHWM"]
        codes = await asyncio.gather(
            *(_unary_code(sidecar.address, START_RUN, payload) for _ in range(unary)),
            *(_stream_code(sidecar.address, CONNECT, payload) for _ in range(streams)),
        )
        grown = memory_mib(sidecar.proc.pid)["VmHWM"] - before
        assert sidecar.proc.returncode is None
    return grown, list(codes[:unary]), list(codes[unary:])


async def test_unauthenticated_big_unary_calls_are_refused_unread() -> None:
    # Before: grpcio received every request whole before the refusal ran
    # (16 x 15 MiB held at once, RSS up by about 300 MiB).
    grown, unary, _ = await _unauthenticated_flood(unary=16, streams=0)
    assert set(unary) == {grpc.StatusCode.UNAUTHENTICATED}
    assert grown < 60, f"the sidecar's peak memory grew {grown:.0f} MiB refusing 16 x 15 MiB calls"


async def test_unauthenticated_big_streams_are_read_a_few_at_a_time() -> None:
    # A refused stream's first message is read only by REFUSAL_READS (4)
    # refusals at once; the rest are refused unread.
    grown, _, streams = await _unauthenticated_flood(unary=0, streams=24)
    assert grpc.StatusCode.OK not in streams and grpc.StatusCode.UNAUTHENTICATED in streams
    assert grown < 200, f"the sidecar's peak memory grew {grown:.0f} MiB refusing 24 x 15 MiB streams"


@pytest.mark.slow
async def test_the_reported_flood_of_48_big_unauthenticated_calls_and_streams() -> None:
    grown, unary, streams = await _unauthenticated_flood(unary=48, streams=48)
    assert set(unary) == {grpc.StatusCode.UNAUTHENTICATED}
    assert grpc.StatusCode.OK not in streams
    assert grown < 250, f"the sidecar's peak memory grew {grown:.0f} MiB (it was 923 MiB for the unary calls alone)"


# -- 2. streams that end mid-message -------------------------------------------------------------

STALL_SETTINGS = TEST_SETTINGS.replace(receive_timeout_s=0.5, max_streams_per_connection=300)
STALLED_METHODS = (
    "/car.v1.RegistryService/GetAgent",  # unary
    "/car.v1.RunService/WatchRun",  # one request, a stream of responses
    CONNECT,  # request streams
    "/car.v1.RunService/Session",
)


async def _stall(peer: RawPeer, methods: tuple[str, ...], per_method: int) -> set[int]:
    """Opens `per_method` streams per method, each sending 5 of a 20-byte message."""
    streams = set()
    for method in methods:
        for _ in range(per_method):
            streams.add(await peer.open(method, truncated_frame(20, b"\x0a\x03abc")))
    return streams


@pytest.mark.parametrize("settings", [STALL_SETTINGS])
async def test_streams_that_stall_mid_message_are_answered_deadline_exceeded(
    settings: Settings, sidecar: Sidecar, client: Client
) -> None:
    # Before: every one was held, unanswered, until the peer closed the connection.
    peer = RawPeer("127.0.0.1", sidecar.port)
    await peer.connect()
    try:
        assert peer.conn.remote_settings.max_concurrent_streams == 300
        streams = await _stall(peer, STALLED_METHODS, 50)
        await peer.read_until(streams, timeout=60)
        assert streams <= peer.ended.keys(), f"{len(streams - peer.ended.keys())} stalled streams were held"
        assert {peer.ended[s].status for s in streams} == {DEADLINE_EXCEEDED}
        assert "did not arrive whole within 0.5 s" in peer.ended[min(streams)].message
        assert not peer.closed  # the connection stays usable; only the stalled calls ended
        whole = await peer.open("/car.v1.RegistryService/ListAgents", grpc_frame(b""), end=True)
        await peer.read_until({whole}, timeout=30)
        assert peer.ended[whole].status == 0
    finally:
        await peer.close()
    assert await client.list_workers() == []  # the sidecar serves on


@pytest.mark.parametrize("settings", [STALL_SETTINGS])
async def test_a_unary_call_without_a_request_message_is_invalid_argument(sidecar: Sidecar) -> None:
    # Before: grpcio's unary path never answered a call that half-closed with no message.
    peer = RawPeer("127.0.0.1", sidecar.port)
    await peer.connect()
    try:
        empty = await peer.open("/car.v1.RegistryService/GetAgent", b"", end=True)
        await peer.read_until({empty}, timeout=30)
        assert peer.ended[empty].status == INVALID_ARGUMENT
        assert "ended before its request message" in peer.ended[empty].message
    finally:
        await peer.close()


async def test_undecodable_requests_are_still_invalid_argument(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.channel.unary_unary(START_RUN)(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request: is not a valid car.v1.StartRunRequest" in (caught.value.details() or "")


@pytest.mark.slow
async def test_3000_stalled_streams_are_let_go_and_their_memory_reused() -> None:
    async with sidecar_process(env={"CARSVC_RECEIVE_TIMEOUT_S": "2"}) as sidecar:
        rounds = []
        for _ in range(4):
            peers = [RawPeer("127.0.0.1", sidecar.port) for _ in range(30)]
            for peer in peers:
                await peer.connect()
            opened = [await _stall(peer, ("/car.v1.RegistryService/GetAgent",), 100) for peer in peers]
            await asyncio.gather(*(p.read_until(s, timeout=120) for p, s in zip(peers, opened, strict=True)))
            ended = sum(len(p.ended) for p in peers)
            for peer in peers:
                await peer.close()
            assert ended == 3000, f"{3000 - ended} of 3,000 stalled streams were held"
            rounds.append(memory_mib(sidecar.proc.pid)["VmHWM"])
        # Memory levels off (gRPC's threads keep their allocator arenas after the
        # first rounds): the last 6,000 streams fit in what the first 6,000 left.
        assert rounds[3] - rounds[1] < 30, rounds


# -- 3. logs a caller can bloat --------------------------------------------------------------------


def _record(msg: str, *args: object, level: int = logging.WARNING, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("carsvc.test", level, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_logged_values_are_cut_to_a_sane_length() -> None:
    record = _record("worker %s connected as %s (%d)", "w" * 2 * MiB, "s-1", 7, worker_id="w" * 2 * MiB)
    assert CutValues().filter(record)
    message = record.getMessage()
    assert len(message) < 400 and "(2097152 characters)" in message and message.endswith("as s-1 (7)")
    assert len(record.__dict__["worker_id"]) < 250
    huge = _record("x" * MiB)  # a message formatted before logging
    CutValues().filter(huge)
    assert len(huge.getMessage()) < 4_100


def test_repeated_warnings_are_rate_limited_with_a_count() -> None:
    now = [100.0]
    summaries: list[logging.LogRecord] = []
    repeats = Repeats(summaries.append, burst=3, window=10, clock=lambda: now[0])
    passed = [repeats.filter(_record("refused %s from %s", "/m", f"peer-{i}")) for i in range(3282)]
    assert passed.count(True) == 3 and passed[:3] == [True, True, True]
    assert repeats.filter(_record("another warning")) and repeats.filter(_record("info", level=logging.INFO))
    repeats.flush()
    assert len(summaries) == 1
    assert summaries[0].getMessage() == (
        "... and 3,279 more like it in the last 10 s (the last: refused /m from peer-3281)"
    )
    now[0] += 10  # a new window: the next one passes again
    assert repeats.filter(_record("refused %s from %s", "/m", "peer-x"))


def test_a_window_that_ends_writes_its_summary_by_itself() -> None:
    summaries: list[logging.LogRecord] = []
    repeats = Repeats(summaries.append, burst=1, window=0.2)
    for _ in range(5):
        repeats.filter(_record("again"))
    deadline = time.monotonic() + 10
    while not summaries and time.monotonic() < deadline:
        time.sleep(0.05)
    assert summaries and summaries[0].getMessage().startswith("... and 4 more like it in the last 0.2 s")


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        ({"worker_id": "w" * 2 * MiB}, "hello.worker_id"),
        ({"sdk": "s" * 100_000}, "hello.sdk"),
        ({"labels": {f"k{i}": "v" for i in range(1_000)}}, "hello.labels"),
        ({"labels": {"team": "x" * 100_000}}, "hello.labels[team]"),
        ({"agents": ["a" * 10_000]}, "hello.agents[0]"),
    ],
)
async def test_a_hello_with_huge_values_is_invalid_argument_naming_the_field(
    sidecar: Sidecar, hello: dict[str, Any], field: str, caplog: pytest.LogCaptureFixture
) -> None:
    fields: dict[str, Any] = {"worker_id": "w", "agents": ["a"], "max_in_flight": 1, **hello}
    async with grpc.aio.insecure_channel(sidecar.address, options=channel_options()) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Connect(
            iter([worker_pb2.ConnectRequest(hello=worker_pb2.WorkerHello(**fields))])
        )
        with caplog.at_level(logging.DEBUG), pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith(f"{field}: ") and len(details) < 300
    assert len(caplog.text) < 20_000


async def test_a_flood_of_refused_calls_writes_a_few_lines_and_a_count() -> None:
    async with sidecar_process(env=AUTH_ENV) as sidecar:
        codes = await asyncio.gather(*(_unary_code(sidecar.address, START_RUN, b"") for _ in range(300)))
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        summary = await sidecar.wait_for_line("more like it in the last 10 s")  # when the 10 s window ends
        refused = [line for line in sidecar.lines if "refused /car.v1.RunService/StartRun" in line]
        assert len(refused) <= 11, f"{len(refused)} refusal lines for 300 refused calls"
        assert "... and 290 more like it" in summary


# -- 4. metrics over HTTPS ---------------------------------------------------------------------


@dataclass
class MetricsPki:
    ca_file: str
    cert_file: str
    key_file: str
    client: tuple[str, str]
    stranger: tuple[str, str]


@pytest.fixture
def pki(tmp_path: Path) -> MetricsPki:
    ca = CertificateAuthority()
    cert_file, key_file = ca.issue("carsvc", server=True).write(tmp_path, "server")
    return MetricsPki(
        ca.write(tmp_path),
        cert_file,
        key_file,
        ca.issue("prometheus", server=False).write(tmp_path, "scraper"),
        CertificateAuthority("someone else").issue("prometheus", server=False).write(tmp_path, "stranger"),
    )


def _https_get(url: str, ca_file: str, client: tuple[str, str] | None) -> str:
    context = ssl.create_default_context(cafile=ca_file)
    if client is not None:
        context.load_cert_chain(*client)
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return str(response.read().decode())


async def _serving_metrics(settings: Settings) -> Sidecar:
    sidecar = Sidecar(settings.replace(metrics_port=_free_port()))
    await sidecar.start()
    return sidecar


@pytest.mark.parametrize("reuse_grpc_files", [False, True])
async def test_metrics_over_https_with_client_certificates(pki: MetricsPki, reuse_grpc_files: bool) -> None:
    if reuse_grpc_files:
        settings = TEST_SETTINGS.replace(
            tls_cert_file=pki.cert_file, tls_key_file=pki.key_file, tls_client_ca_file=pki.ca_file, metrics_tls="grpc"
        )
    else:
        settings = TEST_SETTINGS.replace(
            metrics_tls_cert_file=pki.cert_file,
            metrics_tls_key_file=pki.key_file,
            metrics_tls_client_ca_file=pki.ca_file,
        )
    sidecar = await _serving_metrics(settings)
    try:
        url = f"https://127.0.0.1:{sidecar.metrics_port}/metrics"
        text = await asyncio.to_thread(_https_get, url, pki.ca_file, pki.client)
        assert "carsvc_workers_connected 0.0" in text
        for certificate in (None, pki.stranger):  # no certificate, or one from another CA
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                await asyncio.to_thread(_https_get, url, pki.ca_file, certificate)
        plain = f"http://127.0.0.1:{sidecar.metrics_port}/metrics"
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            await asyncio.to_thread(urllib.request.urlopen, plain, None, 10)
    finally:
        await sidecar.stop(grace=0.5)


async def test_metrics_over_https_without_client_certificates(pki: MetricsPki) -> None:
    sidecar = await _serving_metrics(
        TEST_SETTINGS.replace(metrics_tls_cert_file=pki.cert_file, metrics_tls_key_file=pki.key_file)
    )
    try:
        url = f"https://127.0.0.1:{sidecar.metrics_port}/metrics"
        assert "carsvc_workers_connected" in await asyncio.to_thread(_https_get, url, pki.ca_file, None)
    finally:
        await sidecar.stop(grace=0.5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metrics_tls": "grpc"}, "metrics_tls 'grpc' reuses the gRPC port's TLS files"),
        ({"metrics_tls": "yes"}, "metrics_tls must be 'off' or 'grpc'"),
        ({"metrics_tls_cert_file": "c.pem"}, "metrics_tls_cert_file and metrics_tls_key_file must be set together"),
        ({"metrics_tls_client_ca_file": "ca.pem"}, "metrics_tls_client_ca_file needs metrics_tls_cert_file"),
        ({"receive_timeout_s": -1.0}, "receive_timeout_s must not be negative"),
        ({"max_streams_per_connection": 0}, "max_streams_per_connection must be positive"),
    ],
)
def test_bad_metrics_tls_and_peer_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**changes).validate()


async def test_a_metrics_key_that_does_not_load_stops_the_start(pki: MetricsPki) -> None:
    sidecar = Sidecar(
        TEST_SETTINGS.replace(
            metrics_port=_free_port(), metrics_tls_cert_file=pki.cert_file, metrics_tls_key_file=pki.client[1]
        )
    )
    with pytest.raises(OSError, match="could not serve metrics"):
        await sidecar.start()


# -- 5. runs started during a drain ----------------------------------------------------------------


async def test_runs_started_during_a_drain_are_unavailable(sidecar: Sidecar, client: Client, workers: Workers) -> None:
    release = asyncio.Event()

    async def slow(ctx: AgentContext) -> str:
        await release.wait()
        return "done"

    await workers.start({"slow": slow})
    first = await client.start_run(single(agent("slow"), "hold the drain open"))
    stopping = asyncio.create_task(sidecar.stop(grace=5.0))
    try:
        while sidecar.dispatcher.accepting:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.start_run(single(agent("slow"), "too late"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as session_refused:
            await client.session(single(agent("slow"), "too late"))
        assert session_refused.value.code() == grpc.StatusCode.UNAVAILABLE
        late = client._start_request(single(agent("slow"), "late"))
        late.run_id = "late-run"
        submitted = client.runs.Submit(iter([runs_pb2.SubmitRequest(starts=[late])]))
        answers = [a async for response in submitted for a in response.answers]
        assert answers and answers[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "draining" in answers[0].error.message
        assert [r.run_id for r in (await client.runs.ListRuns(runs_pb2.ListRunsRequest())).runs] == [first.run_id]
    finally:
        release.set()
        await stopping


# -- 6. the Python SDK's reconnect cap and message sizes ----------------------------------------


async def _outage(outage_s: float, cap_s: float) -> float:
    """Seconds from a restarted sidecar listening again to its worker being back,
    after an outage of `outage_s` seconds, for a worker with reconnect cap `cap_s`."""
    port = _free_port()
    worker = Worker(f"127.0.0.1:{port}", worker_id="comes-back", reconnect_max_delay=cap_s)

    @worker.agent("a")
    async def answer(ctx: AgentContext) -> str:
        return "here"

    async with sidecar_process(port=port):
        serving = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 30)
    try:
        while worker.connected.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(outage_s)
        async with sidecar_process(port=port):
            back = time.monotonic()
            await asyncio.wait_for(worker.connected.wait(), 120)
            return time.monotonic() - back
    finally:
        await worker.stop()
        await serving


async def test_a_worker_comes_back_within_its_reconnect_cap(caplog: pytest.LogCaptureFixture) -> None:
    # Before: gRPC's channel backoff (1 s growing to 120 s, shared by channels to
    # one target) kept the worker away for seconds beyond its 0.5 s cap.
    with caplog.at_level(logging.INFO, logger="carsvc.worker"):
        took = await _outage(12.0, 0.5)
    assert took < 0.5 + 3, f"the worker came back {took:.1f} s after the sidecar"
    attempts = [r.getMessage() for r in caplog.records if "; reconnecting in " in r.getMessage()]
    assert attempts[0].endswith("reconnecting in 0.1 s (attempt 1)") and "in 0.5 s (attempt" in attempts[-1]
    numbers = [int(a.rsplit("(attempt ", 1)[1].rstrip(")")) for a in attempts]
    assert numbers == list(range(1, len(numbers) + 1))  # one line per attempt


@pytest.mark.slow
async def test_a_worker_comes_back_within_its_cap_after_a_30_s_outage() -> None:
    took = await _outage(30.0, 5.0)
    assert took < 5.0 + 3, f"the worker came back {took:.1f} s after the sidecar"


def test_sdk_channels_carry_16_mib_messages_and_the_reconnect_cap() -> None:
    options = dict(channel_options(reconnect_max_delay=2.5))
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 16 * MiB
    assert Settings().max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert options["grpc.max_reconnect_backoff_ms"] == 2500 and options["grpc.use_local_subchannel_pool"] == 1
    mine = dict(channel_options(max_message_bytes=MiB, options=[("grpc.max_send_message_length", 5)]))
    assert mine["grpc.max_receive_message_length"] == MiB and mine["grpc.max_send_message_length"] == 5


async def test_the_client_sends_and_receives_messages_over_4_mib(sidecar: Sidecar, client: Client) -> None:
    # gRPC's default client limit is 4 MiB each way; the SDK's is the sidecar's 16 MiB.
    payload = b"\x00" * (6 * MiB)  # not a valid request: it must reach the sidecar to be refused as such
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.channel.unary_unary("/car.v1.RegistryService/ListWorkers")(payload, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    small = Client(sidecar.address, max_message_bytes=MiB)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await small.channel.unary_unary("/car.v1.RegistryService/ListWorkers")(payload, timeout=30)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await small.close()
