"""The sidecar's traces (docs/operations.md, "Traces").

OpenTelemetry is an optional extra (`pip install 'carsvc[otel]'`). This module
decides whether to trace and imports it only then (carsvc/telemetry/otel.py
implements the domain's tracing port, carsvc/domain/tracing.py, with it): when
tracing is off, nothing of OpenTelemetry is imported and every hook the
domain calls is a no-op.

Whether to trace: the `tracing` setting. `on` always (OpenTelemetry must be
installed), `off` never, and `auto` (the default) when the standard OTEL_*
variables ask for traces: OTEL_TRACES_EXPORTER names an exporter other than
`none`, or an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), and OTEL_SDK_DISABLED is not true."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

from carsvc.config import Settings
from carsvc.domain.tracing import Tracer

__all__ = ["Telemetry", "TracingUnavailable", "start_telemetry", "wanted"]

log = logging.getLogger("carsvc.telemetry")

INSTALL_HINT = "pip install 'carsvc[otel]'"


class TracingUnavailable(OSError):
    """Tracing is on (`tracing=on`) but OpenTelemetry is not installed."""


class Telemetry(Protocol):
    """What the server wires in when tracing is on."""

    @property
    def tracer(self) -> Tracer: ...

    def interceptor(self) -> Any:
        """A grpc.aio.ServerInterceptor that reads a client's W3C trace context."""
        ...

    def shutdown(self) -> None:
        """Exports what is left and stops (blocking: call it off the event loop)."""
        ...


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def wanted(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the sidecar traces, from the `tracing` setting and the OTEL_* variables."""
    if settings.tracing == "on":
        return True
    if settings.tracing == "off":
        return False
    environ = os.environ if environ is None else environ
    if _true(environ.get("OTEL_SDK_DISABLED")):
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return any(name.strip() not in ("", "none") for name in exporters.split(","))
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def start_telemetry(settings: Settings, environ: Mapping[str, str] | None = None) -> Telemetry | None:
    """The sidecar's telemetry when it traces, else None (and nothing is imported).

    With `tracing=on` and no OpenTelemetry installed, raises TracingUnavailable;
    with `auto`, logs a warning and runs without traces."""
    if not wanted(settings, environ):
        return None
    try:
        from carsvc.telemetry.otel import OtelTelemetry
    except ImportError as missing:
        message = f"traces need OpenTelemetry, which is not installed ({missing}): {INSTALL_HINT}"
        if settings.tracing == "on":
            raise TracingUnavailable(f"tracing is on, but {message}") from None
        log.warning("the OTEL_* variables ask for traces, but %s; running without traces", message)
        return None
    return OtelTelemetry.from_environment(environ)
