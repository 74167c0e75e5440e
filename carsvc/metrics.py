"""Prometheus metrics for operators.

Counts are read from the dispatcher and the run registry when Prometheus
scrapes (a custom collector), so the hot paths pay nothing for them; only RPC
latency is observed as it happens, by a server interceptor.

The endpoint has no authentication of its own: it binds loopback by default,
speaks HTTPS with the metrics_tls_* settings (or metrics_tls "grpc", the gRPC
port's files), and checks scrapers' client certificates when a client CA is
set. Bearer auth belongs in a reverse proxy (docs/operations.md, "Metrics")."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carsvc._proto.car.v1 import types_pb2

if TYPE_CHECKING:
    from carsvc.config import Settings
    from carsvc.domain.runs import RunManager
    from carsvc.domain.workers import Dispatcher

_STATUS_LABELS: dict[int, str] = {
    int(value): name.removeprefix("RUN_STATUS_").lower()
    for name, value in types_pb2.RunStatus.items()
    if value != types_pb2.RUN_STATUS_UNSPECIFIED
}


class SidecarCollector(Collector):
    def __init__(self, dispatcher: Dispatcher, runs: RunManager) -> None:
        self.dispatcher = dispatcher
        self.runs = runs

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        d, r = self.dispatcher, self.runs
        finished = CounterMetricFamily("carsvc_runs_finished", "Runs that ended, by status", labels=["status"])
        for status, count in sorted(r.finished_by_status.items()):
            finished.add_metric([_STATUS_LABELS.get(status, str(status))], count)
        yield finished
        active = GaugeMetricFamily("carsvc_runs_active", "Runs not finished, by status", labels=["status"])
        by_status: dict[int, int] = {}
        for record in r.runs.values():
            if not record.finished:
                by_status[record.status] = by_status.get(record.status, 0) + 1
        for status, count in sorted(by_status.items()):
            active.add_metric([_STATUS_LABELS.get(status, str(status))], count)
        yield active
        yield CounterMetricFamily("carsvc_agents_dispatched", "Assignments handed to workers", value=d.dispatched)
        yield CounterMetricFamily(
            "carsvc_agents_redispatched", "Assignments handed out again after their worker was lost",
            value=d.redispatched,
        )
        yield CounterMetricFamily("carsvc_results_accepted", "Agent outputs accepted from workers", value=d.accepted)
        yield CounterMetricFamily(
            "carsvc_results_superseded", "Late results of superseded attempts, ignored", value=d.superseded
        )
        yield CounterMetricFamily("carsvc_budget_denials", "Agent spawns a budget refused", value=r.budget_denials)
        yield GaugeMetricFamily("carsvc_workers_connected", "Connected worker sessions", value=len(d.sessions))
        yield GaugeMetricFamily("carsvc_assignments_in_flight", "Assignments held by workers", value=d.in_flight)
        yield GaugeMetricFamily("carsvc_assignments_queued", "Assignments waiting for a worker slot", value=d.queued)


class Metrics:
    """The sidecar's metrics registry (one per sidecar, so tests can run several)."""

    def __init__(self, dispatcher: Dispatcher, runs: RunManager) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(SidecarCollector(dispatcher, runs))
        self.rpc_seconds = Histogram(
            "carsvc_rpc_seconds",
            "Latency of unary RPCs and time to first response of streaming RPCs",
            ["method", "code"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _LatencyInterceptor(self.rpc_seconds)


def metrics_tls_files(settings: Settings) -> tuple[str, str, str]:
    """The metrics endpoint's certificate chain, key and client CA files
    (empty strings: plain HTTP, no client certificates)."""
    if settings.metrics_tls == "grpc":
        return settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    return settings.metrics_tls_cert_file, settings.metrics_tls_key_file, settings.metrics_tls_client_ca_file


def metrics_url(settings: Settings, port: int) -> str:
    scheme = "https" if metrics_tls_files(settings)[0] else "http"
    return f"{scheme}://{settings.metrics_host}:{port}/metrics"


def serve_metrics(registry: CollectorRegistry, settings: Settings) -> WSGIServer:
    """Starts the metrics endpoint on its own thread (HTTPS when configured,
    client certificates required when a client CA is set). OSError (ssl.SSLError
    included) when it cannot bind or a TLS file does not load."""
    cert, key, client_ca = metrics_tls_files(settings)
    server, _ = start_http_server(
        settings.metrics_port,
        settings.metrics_host,
        registry,
        certfile=cert or None,
        keyfile=key or None,
        client_cafile=client_ca or None,
        client_auth_required=bool(client_ca),
    )
    return server


class _LatencyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Times RPCs with one response (streams of responses live as long as their
    callers want). The request guard (carsvc.services.decoding) serves unary
    requests as request streams, so both shapes are timed."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.response_streaming:
            return handler
        method = handler_call_details.method
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
        histogram = self.histogram

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except BaseException:
                code = context.code().name if context.code() is not None else "UNKNOWN"
                raise
            finally:
                histogram.labels(method, code).observe(time.perf_counter() - started)

        shape = (
            grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        )
        return shape(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
