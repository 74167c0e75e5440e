"""Prometheus metrics for operators.

Counts are read from the dispatcher and the run registry when Prometheus
scrapes (a custom collector), so the hot paths pay nothing for them; only RPC
latency is observed as it happens, by a server interceptor."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carsvc._proto.car.v1 import types_pb2

if TYPE_CHECKING:
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


class _LatencyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Times unary-unary RPCs (streams live as long as their callers want)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = handler_call_details.method
        inner = handler.unary_unary
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

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
