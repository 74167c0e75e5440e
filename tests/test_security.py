"""Authentication and TLS over real gRPC: a sidecar on a loopback port 0, the
real Worker and Client SDKs, certificates made by tests/certs.py."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from carsvc._proto.car.v1 import registry_pb2, types_pb2, worker_pb2, worker_pb2_grpc
from carsvc.client import Client, agent, single
from carsvc.config import Settings
from carsvc.security import TLS, auth, open_channel
from carsvc.security.auth import SERVICE_SCOPES, Scope, bearer_token
from carsvc.security.server import ServerSecurity, is_loopback
from carsvc.security.tokens import TokenSet, parse_token_file, parse_token_list, read_token_file
from carsvc.server import SERVICE_NAMES, Sidecar
from carsvc.worker import AgentContext, Worker, WorkerRefused
from tests.certs import CertificateAuthority
from tests.conftest import TEST_SETTINGS, Workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TOKEN = "w-8b7f2c41d0e6a95f3e1b"
CLIENT_TOKEN = "c-51e0c9a7b3d24f68a0c2"
AUTH_SETTINGS = TEST_SETTINGS.replace(worker_tokens=WORKER_TOKEN, client_tokens=f"c-other-token-0001,{CLIENT_TOKEN}")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


async def _echo(ctx: AgentContext) -> str:
    return f"echo {ctx.task}"


# -- token files and lists --------------------------------------------------------------


def test_token_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# rotated 2026-01\n\n  first-token-abcdef  \n\t# old: second\nthird-token-123456\r\n")
    assert read_token_file(str(path), "worker_tokens_file") == ["first-token-abcdef", "third-token-123456"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no token"),
        ("# only a comment\n\n", "holds no token"),
        ("good-token\nnot a token\n", r"line 2 is not a valid token"),
        ("tök\n", r"line 1 is not a valid token"),
    ],
)
def test_bad_token_files_are_errors_that_do_not_echo_tokens(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        read_token_file(str(path), "client_tokens_file")
    assert "client_tokens_file" in str(caught.value)
    assert "not a token" not in str(caught.value) and "tök" not in str(caught.value)


def test_unreadable_token_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        read_token_file(str(tmp_path / "missing"), "worker_tokens_file")
    with pytest.raises(ValueError, match="cannot be read"):
        read_token_file(str(tmp_path), "worker_tokens_file")  # a directory
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00token")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_token_file(str(binary), "worker_tokens_file")


def test_token_lists_and_files_parse_alike() -> None:
    assert parse_token_list(" a-token , ,b-token,", "CARSVC_WORKER_TOKENS") == ["a-token", "b-token"]
    assert parse_token_list("", "CARSVC_WORKER_TOKENS") == []
    with pytest.raises(ValueError, match="CARSVC_CLIENT_TOKENS entry 2"):
        parse_token_list("ok,not ok", "CARSVC_CLIENT_TOKENS")
    assert parse_token_file("#\nx\n", "f") == ["x"]


def test_token_set_matches_exactly() -> None:
    tokens = TokenSet(["alpha-token", "beta-token", "alpha-token"])
    assert len(tokens) == 2 and "alpha" not in repr(tokens)
    assert tokens.contains("alpha-token") and tokens.contains(b"beta-token")
    for wrong in ("", "alpha", "alpha-token ", "alpha-tokenX", "ALPHA-TOKEN", "ä"):
        assert not tokens.contains(wrong)
    assert not TokenSet().contains("anything")
    assert tokens.overlaps(TokenSet(["beta-token"])) and not tokens.overlaps(TokenSet(["gamma"]))


def test_bearer_token_is_read_from_authorization_metadata() -> None:
    assert bearer_token((("x-other", "1"), ("authorization", "Bearer abc"))) == "abc"
    assert bearer_token((("authorization", "bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token((("authorization", "Bearer"),)) is None
    assert bearer_token(()) is None and bearer_token(None) is None


def test_settings_read_tokens_from_the_environment_and_never_show_them() -> None:
    settings = Settings.from_env({"CARSVC_WORKER_TOKENS": "secret-w-1,secret-w-2", "CARSVC_CLIENT_TOKENS": "secret-c"})
    assert settings.worker_tokens == "secret-w-1,secret-w-2"
    assert "secret" not in repr(settings)
    security = ServerSecurity.from_settings(settings)
    assert security.auth_enabled and len(security.tokens[Scope.WORKER]) == 2
    assert "secret" not in security.describe() and "secret" not in repr(security)


def test_files_and_environment_tokens_combine(tmp_path: Path) -> None:
    path = tmp_path / "workers"
    path.write_text("from-file-token\n")
    settings = TEST_SETTINGS.replace(
        worker_tokens_file=str(path), worker_tokens="from-env-token", client_tokens="client-token"
    )
    tokens = ServerSecurity.from_settings(settings).tokens[Scope.WORKER]
    assert tokens.contains("from-file-token") and tokens.contains("from-env-token")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"worker_tokens": "only-workers"}, "worker tokens are configured but client tokens are not"),
        ({"client_tokens": "only-clients"}, "client tokens are configured but worker tokens are not"),
        ({"worker_tokens": "same-token", "client_tokens": "same-token"}, "both a worker and a client token"),
        ({"tls_cert_file": "cert.pem"}, "tls_cert_file and tls_key_file must be set together"),
        ({"tls_client_ca_file": "ca.pem"}, "needs tls_cert_file and tls_key_file"),
    ],
)
def test_inconsistent_security_settings_are_rejected(changes: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sidecar(TEST_SETTINGS.replace(**changes))


def test_without_tokens_auth_is_off_and_costs_nothing() -> None:
    security = ServerSecurity.from_settings(TEST_SETTINGS)
    assert not security.auth_enabled and security.interceptors() == [] and security.credentials is None
    assert security.describe() == "authentication off, TLS off"


def test_every_carsvc_service_has_a_scope() -> None:
    assert set(SERVICE_NAMES) == set(SERVICE_SCOPES)
    assert [s for s, scope in SERVICE_SCOPES.items() if scope is Scope.WORKER] == ["car.v1.WorkerService"]


# -- startup warnings ---------------------------------------------------------------------


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "[::]", "", "10.0.0.5", "sidecar.internal"))


def _warnings(caplog: pytest.LogCaptureFixture, settings: Settings, host: str) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="carsvc.security"):
        ServerSecurity.from_settings(settings).log_startup(host)
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_binding_beyond_loopback_without_auth_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert _warnings(caplog, TEST_SETTINGS, "127.0.0.1") == ""
    assert "WITHOUT authentication" in _warnings(caplog, TEST_SETTINGS, "0.0.0.0")
    with_auth = _warnings(caplog, AUTH_SETTINGS, "0.0.0.0")
    assert "WITHOUT authentication" not in with_auth
    assert "bearer tokens travel in clear text" in with_auth
    assert "shorter than" in _warnings(caplog, TEST_SETTINGS.replace(worker_tokens="w", client_tokens="c"), "::1")


# -- authentication over real gRPC ------------------------------------------------------------


@pytest.fixture
def settings() -> Settings:
    return AUTH_SETTINGS


@pytest.fixture
def secured(sidecar: Sidecar) -> str:
    """The address of a sidecar (the conftest fixture) running AUTH_SETTINGS."""
    return sidecar.address


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    code: grpc.StatusCode = caught.value.code()
    return code


async def _client_calls(address: str, token: str | None) -> list[grpc.StatusCode]:
    """The statuses of unary RPCs of two services, a server stream and a bidi stream."""
    async with Client(address, token=token) as client:
        start = await _code(client.start_run(single(agent("a"), "t")))
        state = await _code(client.get_state("scope", "key"))

        async def watch() -> None:
            async for _ in client.watch("run-1"):
                pass

        server_stream = await _code(watch())
        bidi = await _code(client.session(single(agent("a"), "t")))
        return [start, state, server_stream, bidi]


async def test_client_rpcs_without_a_token_are_unauthenticated(secured: str) -> None:
    assert await _client_calls(secured, None) == [UNAUTHENTICATED] * 4


async def test_client_rpcs_with_a_wrong_token_are_unauthenticated(secured: str) -> None:
    assert await _client_calls(secured, "c-51e0c9a7b3d24f68a0c3") == [UNAUTHENTICATED] * 4


async def test_a_worker_token_cannot_use_client_services(secured: str) -> None:
    assert await _client_calls(secured, WORKER_TOKEN) == [UNAUTHENTICATED] * 4
    async with Client(secured, token=WORKER_TOKEN) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.list_workers()
    assert caught.value.details() == (
        "the bearer token is not a client token of this sidecar (/car.v1.RegistryService/ListWorkers needs one)"
    )


async def _connect_status(
    address: str, metadata: tuple[tuple[str, str], ...] | None, *, hello: bool = True
) -> grpc.StatusCode:
    """Opens WorkerService.Connect with a raw stub and returns how it ends."""

    async def frames() -> AsyncIterator[worker_pb2.ConnectRequest]:
        if hello:
            yield worker_pb2.ConnectRequest(
                hello=worker_pb2.WorkerHello(worker_id="raw", agents=["a"], max_in_flight=1)
            )
        await asyncio.sleep(30)
        yield worker_pb2.ConnectRequest()

    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Connect(frames(), metadata=metadata)
        try:
            first = await asyncio.wait_for(call.read(), 10)
        except grpc.aio.AioRpcError as err:
            code: grpc.StatusCode = err.code()
            return code
        call.cancel()
        assert first.HasField("welcome")
        return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, UNAUTHENTICATED),
        ("w-8b7f2c41d0e6a95f3e1c", UNAUTHENTICATED),  # wrong
        (CLIENT_TOKEN, UNAUTHENTICATED),  # a client token cannot connect as a worker
        (WORKER_TOKEN, grpc.StatusCode.OK),
    ],
)
async def test_worker_connect_needs_a_worker_token(secured: str, token: str | None, expected: grpc.StatusCode) -> None:
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    assert await _connect_status(secured, metadata) == expected


async def test_a_refused_stream_that_sends_nothing_still_ends(secured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "FIRST_MESSAGE_WAIT_S", 0.05)
    assert await _connect_status(secured, None, hello=False) == UNAUTHENTICATED


@pytest.mark.parametrize("token", [None, CLIENT_TOKEN])
async def test_the_worker_sdk_is_refused_without_a_worker_token(
    secured: str, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(secured, reconnect=False, token=token)
    worker.add_agent("a", _echo)
    with caplog.at_level(logging.WARNING), pytest.raises(WorkerRefused) as caught:
        await asyncio.wait_for(worker.run(), 10)  # a refused credential is final: run() raises
    assert caught.value.code == UNAUTHENTICATED
    assert not worker.connected.is_set()
    assert "refused the worker's credentials (UNAUTHENTICATED: " in caplog.text
    async with Client(secured, token=CLIENT_TOKEN) as client:
        assert await client.list_workers() == []


async def test_right_tokens_serve_a_run_end_to_end(secured: str, caplog: pytest.LogCaptureFixture) -> None:
    pool = Workers(secured)
    try:
        with caplog.at_level(logging.DEBUG):
            await pool.start({"a": _echo}, token=WORKER_TOKEN)
            async with Client(secured, token=CLIENT_TOKEN) as client:
                run = await client.run(single(agent("a"), "hello"), thread_id="t1")
                assert run.status == types_pb2.RUN_STATUS_SUCCEEDED
                assert run.result.single.output.answer == "echo hello"
                assert [w.worker_id for w in await client.list_workers()] != []
                await client.set_state("t1", "k", 7)
                assert await client.get_state("t1", "k") == 7
                session = await client.session(single(agent("a"), "again"), thread_id="t2")
                kinds = [e.WhichOneof("kind") async for e in session.events()]
                await session.close()
                assert kinds[-1] == "run_finished"
                # Per-call metadata of the caller's own wins over the channel's token.
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.registry.ListWorkers(
                        registry_pb2.ListWorkersRequest(), metadata=(("authorization", "Bearer nope"),)
                    )
                assert caught.value.code() == UNAUTHENTICATED
    finally:
        await pool.stop_all()
    assert WORKER_TOKEN not in caplog.text and CLIENT_TOKEN not in caplog.text


async def test_refusals_are_logged_without_the_token(secured: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="carsvc.security"):
        async with Client(secured, token=WORKER_TOKEN) as client:
            await _code(client.list_workers())
    assert "refused /car.v1.RegistryService/ListWorkers from ipv4:127.0.0.1:" in caplog.text
    assert WORKER_TOKEN not in caplog.text


async def test_health_and_reflection_need_no_token(secured: str) -> None:
    async with grpc.aio.insecure_channel(secured) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in replies for s in r.list_services_response.service]
    assert "car.v1.RunService" in names


async def test_an_unknown_method_stays_unimplemented(secured: str) -> None:
    async with grpc.aio.insecure_channel(secured) as channel:
        method = channel.unary_unary("/car.v1.RunService/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_sdk_rejects_malformed_tokens_and_conflicting_options() -> None:
    with pytest.raises(ValueError, match="not a valid token"):
        Worker("127.0.0.1:1", token="two words")
    with pytest.raises(ValueError, match="not a valid token"):
        open_channel("127.0.0.1:1", token="")
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(ValueError, match="not usable with channel="):
            Client("x", channel=channel, token="t")
    with pytest.raises(ValueError, match="together"):
        TLS(certificate_chain=b"-----BEGIN CERTIFICATE-----")


# -- TLS and mutual TLS ----------------------------------------------------------------------


class Pki:
    """A CA, a server certificate, a client certificate, and a stranger CA's client certificate."""

    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority()
        self.ca_file = self.ca.write(directory)
        self.cert_file, self.key_file = self.ca.issue("carsvc", server=True).write(directory, "server")
        self.client = self.ca.issue("agent-app", server=False)
        self.stranger = CertificateAuthority("someone else").issue("agent-app", server=False)
        self.other_ca = CertificateAuthority("another CA").cert_pem

    def settings(self, *, mutual: bool, **changes: Any) -> Settings:
        return TEST_SETTINGS.replace(
            tls_cert_file=self.cert_file,
            tls_key_file=self.key_file,
            tls_client_ca_file=self.ca_file if mutual else "",
            **changes,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def _health(address: str, tls: TLS | None) -> grpc.StatusCode:
    async with open_channel(address, tls=tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as err:
            code: grpc.StatusCode = err.code()
            return code
    return grpc.StatusCode.OK


async def _started(settings: Settings) -> Sidecar:
    sidecar = Sidecar(settings)
    await sidecar.start()
    return sidecar


async def test_tls(pki: Pki) -> None:
    sidecar = await _started(pki.settings(mutual=False))
    try:
        assert sidecar.security.describe() == "authentication off, TLS TLS"
        for host in ("127.0.0.1", "localhost"):
            address = f"{host}:{sidecar.port}"
            assert await _health(address, TLS(root_certificates=pki.ca.cert_pem)) == grpc.StatusCode.OK
        assert await _health(sidecar.address, TLS(root_certificates=pki.ca_file)) == grpc.StatusCode.OK
        assert await _health(sidecar.address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert await _health(sidecar.address, TLS(root_certificates=pki.other_ca)) == grpc.StatusCode.UNAVAILABLE
        # A certificate for "carsvc.internal" does not cover localhost unless the name is overridden.
        wrong_name = TLS(root_certificates=pki.ca.cert_pem, server_name="carsvc.internal")
        assert await _health(sidecar.address, wrong_name) == grpc.StatusCode.UNAVAILABLE
    finally:
        await sidecar.stop(grace=0.5)


async def test_mutual_tls(pki: Pki) -> None:
    sidecar = await _started(pki.settings(mutual=True))
    try:
        roots = pki.ca.cert_pem
        assert await _health(sidecar.address, TLS(roots)) == grpc.StatusCode.UNAVAILABLE  # no client cert
        stranger = TLS(roots, certificate_chain=pki.stranger.cert, private_key=pki.stranger.key)
        assert await _health(sidecar.address, stranger) == grpc.StatusCode.UNAVAILABLE
        assert await _health(sidecar.address, None) == grpc.StatusCode.UNAVAILABLE
        good = TLS(roots, certificate_chain=pki.client.cert, private_key=pki.client.key)
        assert await _health(sidecar.address, good) == grpc.StatusCode.OK
        pem_text = TLS(roots.decode(), certificate_chain=pki.client.cert.decode(), private_key=pki.client.key.decode())
        assert await _health(sidecar.address, pem_text) == grpc.StatusCode.OK
    finally:
        await sidecar.stop(grace=0.5)


async def test_mutual_tls_and_tokens_serve_a_run(pki: Pki) -> None:
    settings = pki.settings(mutual=True, worker_tokens=WORKER_TOKEN, client_tokens=CLIENT_TOKEN)
    sidecar = await _started(settings)
    tls = TLS(pki.ca.cert_pem, certificate_chain=pki.client.cert, private_key=pki.client.key)
    pool = Workers(sidecar.address)
    try:
        assert sidecar.security.describe() == "authentication bearer tokens (1 worker, 1 client), TLS mutual TLS"
        await pool.start({"a": _echo}, token=WORKER_TOKEN, tls=tls)
        async with Client(sidecar.address, token=CLIENT_TOKEN, tls=tls) as client:
            run = await client.run(single(agent("a"), "over mTLS"))
            assert run.result.single.output.answer == "echo over mTLS"
        async with Client(sidecar.address, tls=tls) as client:  # the certificate alone is not enough
            assert await _code(client.list_workers()) == UNAUTHENTICATED
        assert await _health(sidecar.address, tls) == grpc.StatusCode.OK
    finally:
        await pool.stop_all()
        await sidecar.stop(grace=0.5)


def test_bad_tls_files_are_rejected(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tls_cert_file .* cannot be read"):
        Sidecar(pki.settings(mutual=False).replace(tls_cert_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ValueError, match=r"tls_key_file .* holds no PEM private key"):
        Sidecar(pki.settings(mutual=False).replace(tls_key_file=pki.cert_file))
    with pytest.raises(ValueError, match=r"tls_client_ca_file .* holds no PEM certificate"):
        Sidecar(pki.settings(mutual=True).replace(tls_client_ca_file=pki.key_file))
    other = CertificateAuthority().issue("carsvc", server=True).write(tmp_path, "other")
    with pytest.raises(ValueError, match=r"not a certificate chain and its unencrypted private key: KEY_VALUES_MISM"):
        Sidecar(pki.settings(mutual=False).replace(tls_key_file=other[1]))
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=r"are not a certificate chain"):
        Sidecar(pki.settings(mutual=False).replace(tls_cert_file=str(junk)))
    with pytest.raises(ValueError, match=r"tls_client_ca_file .* is not a PEM CA certificate"):
        Sidecar(pki.settings(mutual=True).replace(tls_client_ca_file=str(junk)))
    with pytest.raises(ValueError, match=r"root_certificates .* cannot be read"):
        open_channel("127.0.0.1:1", tls=TLS(root_certificates=str(tmp_path / "nope.pem")))


# -- the command line ------------------------------------------------------------------------


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carsvc", "serve", "--port", "0", *args], cwd=ROOT, capture_output=True,
        text=True, env={**os.environ, **(env or {})}, timeout=60,
    )


def test_cli_rejects_bad_token_files_with_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    done = _serve("--worker-tokens-file", str(tmp_path / "missing"), "--client-tokens-file", str(empty))
    assert done.returncode == 2
    assert done.stderr.startswith("carsvc: worker_tokens_file ") and "cannot be read" in done.stderr
    done = _serve("--client-tokens-file", str(empty), env={"CARSVC_WORKER_TOKENS": "w-token-from-env-0001"})
    assert done.returncode == 2 and "holds no token" in done.stderr
    done = _serve("--tls-cert-file", str(empty))
    assert done.returncode == 2 and "tls_cert_file and tls_key_file must be set together" in done.stderr


def test_cli_takes_no_token_values() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "carsvc", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "--worker-tokens-file" in done.stdout and "--tls-client-ca-file" in done.stdout
    assert "--worker-tokens " not in done.stdout and "--client-tokens " not in done.stdout


async def test_cli_serves_with_tokens_from_files(tmp_path: Path) -> None:
    (tmp_path / "workers").write_text(f"# workers\n{WORKER_TOKEN}\n")
    (tmp_path / "clients").write_text(f"{CLIENT_TOKEN}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", "0",
        "--worker-tokens-file", str(tmp_path / "workers"), "--client-tokens-file", str(tmp_path / "clients"),
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        lines: list[bytes] = []
        while b"carsvc security:" not in (line := await asyncio.wait_for(proc.stderr.readline(), 30)):
            assert line, b"".join(lines).decode()
            lines.append(line)
        assert b"authentication bearer tokens (1 worker, 1 client), TLS off" in line
        port = int(next(x for x in lines if b"listening on" in x).rsplit(b":", 1)[1])
        async with Client(f"127.0.0.1:{port}") as client:
            assert await _code(client.list_workers()) == UNAUTHENTICATED
        async with Client(f"127.0.0.1:{port}", token=CLIENT_TOKEN) as client:
            assert await client.list_workers() == []
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)

