"""The sidecar process: builds the gRPC server with every service, health and
reflection, and owns its lifecycle (start, drain, graceful stop)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from carsvc._proto.car.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from carsvc.backends import open_backend
from carsvc.config import Settings
from carsvc.domain.registry import AgentRegistry
from carsvc.domain.runs import RunManager, RunSettings
from carsvc.domain.specs import Limits
from carsvc.domain.workers import Dispatcher
from carsvc.metrics import Metrics, metrics_url, serve_metrics
from carsvc.security.server import ServerSecurity
from carsvc.services.budget import BudgetService
from carsvc.services.calls import CallHandler
from carsvc.services.decoding import RequestGuard
from carsvc.services.ownership import RunOwnership
from carsvc.services.peers import PeerLinks
from carsvc.services.registry import RegistryService
from carsvc.services.remote import RemoteRuns
from carsvc.services.replication import Replication
from carsvc.services.runs import EventService, RunService
from carsvc.services.state import StateService
from carsvc.services.watchers import add_servicer
from carsvc.services.worker import WorkerService
from carsvc.telemetry import Telemetry, start_telemetry

if TYPE_CHECKING:  # aiohttp is imported only when the console is on
    from carsvc.http import Console

log = logging.getLogger("carsvc")

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (worker_pb2, "WorkerService"),
        (runs_pb2, "RunService"),
        (registry_pb2, "RegistryService"),
        (state_pb2, "StateService"),
        (budget_pb2, "BudgetService"),
        (events_pb2, "EventService"),
    )
)


def keepalive_options(s: Settings) -> list[tuple[str, int]]:
    """The server's HTTP/2 keepalive pings (none when keepalive_time_s is 0)."""
    if not s.keepalive_time_s:
        return []
    return [
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
    ]


class AddressInUse(OSError):
    """Another process listens on the sidecar's address."""


def check_address_free(host: str, port: int) -> None:
    """Raises AddressInUse when another process listens on host:port. gRPC
    would fail too, but only after logging C-core errors that never say why."""
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # gRPC resolves it and says what is wrong
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise AddressInUse(f"{host}:{port} is already in use") from None


class Sidecar:
    """One sidecar: the embedded in-memory backend plus its gRPC server."""

    def __init__(
        self,
        settings: Settings | None = None,
        security: ServerSecurity | None = None,
        *,
        telemetry: Telemetry | None = None,
    ) -> None:
        """`telemetry`: traces to make (tests, an embedding program); by default
        the `tracing` setting and the OTEL_* variables decide (carsvc/telemetry)."""
        self.settings = s = settings or Settings()
        # Tokens and TLS, loaded now so a bad file fails before anything starts.
        self.security = security or ServerSecurity.from_settings(s)
        self.dispatcher = Dispatcher.from_settings(s)
        self.backend = open_backend(s)
        self.registry = AgentRegistry()
        self.runs = RunManager(
            self.dispatcher,
            RunSettings.from_settings(s),
            self.backend,
        )
        # Traces: None (and nothing of OpenTelemetry imported) unless tracing is on.
        self.telemetry = telemetry if telemetry is not None else start_telemetry(s)
        if self.telemetry is not None:
            self.runs.tracer = self.telemetry.tracer
        self.limits = limits = Limits(
            max_field_bytes=s.max_field_bytes,
            max_items=s.max_items,
            max_agents=s.max_agents_per_pattern,
            max_value_depth=s.max_value_depth,
        )
        self.health = health.aio.HealthServicer()
        self.run_service = RunService(
            self.runs, self.registry, limits, s.watcher_buffer, watcher_max_bytes=s.watcher_max_bytes
        )
        self._server: grpc.aio.Server | None = None
        # With a shared backend: the other replicas' workers, and work for ours.
        self.peers: PeerLinks | None = None
        self.ownership: RunOwnership | None = None
        feed = self.backend.changes
        self.replication = Replication(feed, self.runs, self.registry) if feed is not None else None
        self._monitor: asyncio.Task[None] | None = None
        self.metrics = Metrics(self.dispatcher, self.runs)
        self._metrics_http: WSGIServer | None = None
        self._console: Console | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        """Binds, starts serving and reports SERVING; returns the bound port."""
        s = self.settings
        check_address_free(s.host, s.port)
        # Metrics first: they see the status of every call, refused ones included.
        # Last, the decoder guard: it wraps the servicers' own handlers.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            self.metrics.interceptor(),
            *self.security.interceptors(),
            RequestGuard(s.receive_timeout_s),
        ]
        if self.telemetry is not None:  # a client's traceparent: the parent of the run it starts
            interceptors.insert(0, self.telemetry.interceptor())
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Broken peers (SECURITY.md): streams per connection, and pings
                # that find connections whose peer is gone.
                ("grpc.max_concurrent_streams", s.max_streams_per_connection),
                *keepalive_options(s),
            ]
        )
        calls = CallHandler(self.dispatcher, s.max_field_bytes, s.max_value_depth, s.max_state_keys)
        workers = WorkerService(
            self.dispatcher,
            calls,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            heartbeat_misses=s.heartbeat_misses,
            max_message_bytes=s.max_message_bytes,
            max_output_bytes=s.max_output_bytes,
            max_value_depth=s.max_value_depth,
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(workers, server)
        events = EventService(self.runs, s.watcher_buffer, s.watcher_max_bytes)
        bus = self.backend.bus
        if bus is not None:
            self.peers = PeerLinks(bus, self.dispatcher, workers, calls, interval=s.heartbeat_interval_ms / 1000)
        directory = self.backend.directory
        if directory is not None and self.peers is not None:
            remote = RemoteRuns(directory, self.peers, s.max_inline_result_bytes)
            self.run_service.join(remote)
            events.remote = remote
            self.ownership = RunOwnership(
                self.runs, directory, self.run_service.pattern_of,
                interval=s.heartbeat_interval_ms / 1000, lease_ms=int(s.heartbeat_timeout_s * 1000),
            )
        # Watchers are sent events serialized once, as bytes (services/watchers.py).
        add_servicer(
            runs_pb2_grpc.add_RunServiceServicer_to_server, self.run_service, server, ("WatchRun", "Session")
        )
        add_servicer(
            events_pb2_grpc.add_EventServiceServicer_to_server,
            events,
            server,
            ("ReadEvents",),
        )
        registry = RegistryService(self.registry, self.dispatcher, self.limits)
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
        state = StateService(
            self.runs,
            s.max_field_bytes,
            s.watcher_buffer,
            max_value_depth=s.max_value_depth,
            max_state_keys=s.max_state_keys,
            watcher_max_bytes=s.watcher_max_bytes,
        )
        add_servicer(state_pb2_grpc.add_StateServiceServicer_to_server, state, server, ("Watch",))
        budget = BudgetService(self.runs)
        budget_pb2_grpc.add_BudgetServiceServicer_to_server(budget, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        try:
            port = self.security.bind(server, s.address)
        except RuntimeError as err:
            raise OSError(f"carsvc could not listen on {s.address}: {err}") from None
        store = self.backend.store
        if store is not None:
            where = self.backend.describe()
            try:
                recovered = await asyncio.get_running_loop().run_in_executor(None, store.load)
            except OSError as err:  # redis-py's ConnectionError is one
                await self.backend.close()
                raise OSError(f"carsvc could not read its runs from {where}: {err}") from None
            store.start()  # before restore: what it writes (and waits for) is committed
            if self.replication is not None:  # registered agents first: resumed runs may name them
                await self.replication.start()
            await self.runs.restore(recovered, self.run_service.pattern_of)
            if self.ownership is not None:
                taken = await self.ownership.recover()
                log.info("%s as replica %s: took %d active run(s)", where, self.ownership.directory.replica_id, taken)
            log.info("%s: recovered %d runs and %d state scopes", where, len(recovered.runs), len(recovered.state))
            if recovered.skipped_rows:
                log.warning(
                    "%s: skipped records that could not be read back (%s); runs missing events are "
                    "marked history_incomplete", where,
                    ", ".join(f"{n} in {table}" for table, n in sorted(recovered.skipped_rows.items())),
                )
        await server.start()
        if self.peers is not None:
            await self.peers.start()
        if self.ownership is not None:
            self.ownership.start()
        self._server = server
        self.port = port
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._monitor = asyncio.get_running_loop().create_task(self._watch_heartbeats())
        if s.console_port:  # the HTTP/JSON API and web console (carsvc/http/, docs/console.md)
            from carsvc.http import Api, Console

            api = Api(self.run_service, state, budget, registry, receive_timeout=s.receive_timeout_s)
            console = Console(s, self.security, api)
            try:
                await console.start()
            except OSError as err:
                await server.stop(None)
                where = f"{s.console_host}:{s.console_port}"
                raise OSError(f"carsvc could not serve the console on {where}: {err}") from None
            self._console = console
        if s.metrics_port:
            try:
                self._metrics_http = serve_metrics(self.metrics.registry, s)
            except OSError as err:
                await server.stop(None)
                if self._console is not None:
                    await self._console.stop()
                raise OSError(f"carsvc could not serve metrics on {s.metrics_host}:{s.metrics_port}: {err}") from None
            log.info("metrics on %s", metrics_url(s, self._metrics_http.server_port))
        log.info("carsvc listening on %s:%d", s.host, port)
        self.security.log_startup(s.host)
        return port

    @property
    def console_port(self) -> int:
        return self._console.port if self._console is not None else 0

    @property
    def metrics_port(self) -> int:
        return self._metrics_http.server_port if self._metrics_http is not None else 0

    async def _watch_heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            self.dispatcher.check_heartbeats()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, drain workers, let runs finish within the
        grace period, cancel the rest, then close the server."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info("carsvc draining (grace %.1fs)", grace)
        await self.health.enter_graceful_shutdown()
        self.dispatcher.drain("the sidecar is shutting down", int(grace * 1000))
        await self.runs.shutdown(grace)
        if self.ownership is not None:
            await self.ownership.stop()  # parked runs' leases go: another replica takes them at once
        if self.peers is not None:
            await self.peers.stop()
        if self.replication is not None:
            await self.replication.stop()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        server, self._server = self._server, None
        if self._console is not None:
            await self._console.stop()
            self._console = None
        await server.stop(1.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self.backend.store is not None:
            # Off the loop: the last commit reports back to it.
            await asyncio.get_running_loop().run_in_executor(None, self.backend.store.close)
        if self.ownership is not None:
            with contextlib.suppress(Exception):  # Redis away: the leases lapse instead
                await self.ownership.release_parked()
        await self.backend.close()
        if self.telemetry is not None:  # the last spans (runs that just ended) go out
            await asyncio.get_running_loop().run_in_executor(None, self.telemetry.shutdown)
        log.info("carsvc stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: Settings, security: ServerSecurity | None = None) -> None:
    """Runs a sidecar until SIGINT or SIGTERM, then stops it gracefully."""
    sidecar = Sidecar(settings, security)
    await sidecar.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await sidecar.stop()
