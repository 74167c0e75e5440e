"""The SDK side: channels to the sidecar with TLS and a bearer token.

    from carsvc.security import TLS
    tls = TLS(root_certificates="/etc/carsvc/ca.pem")              # server-side TLS
    tls = TLS("/etc/carsvc/ca.pem", certificate_chain="client.pem",
              private_key="client.key")                             # mutual TLS
    Client("sidecar:50051", token=os.environ["CARSVC_TOKEN"], tls=tls)

The token travels as `authorization: Bearer <token>` call metadata, which works
on plaintext loopback channels too (gRPC's own call credentials need TLS).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from carsvc.security.tokens import check_token

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "TLS", "addresses", "bearer_metadata", "channel_options", "open_channel"]

PemSource = bytes | str | os.PathLike[str]


def _pem(source: PemSource | None, what: str) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a file path."""
    if source is None or isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode("ascii")
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"TLS {what} {os.fspath(source)!r} cannot be read: {err.strerror or err}") from None


@dataclass(frozen=True)
class TLS:
    """TLS options of a Worker's or Client's channel.

    Each certificate or key is PEM bytes, PEM text, or a path to a PEM file.
    `root_certificates`: the CA(s) that signed the sidecar's certificate (None:
    the system's roots). `certificate_chain` and `private_key`: this process's
    certificate for mutual TLS (both or neither). `server_name`: the name to
    check in the sidecar's certificate when it differs from the target's host
    (for example a certificate for "carsvc.internal" reached by IP address).
    """

    root_certificates: PemSource | None = None
    certificate_chain: PemSource | None = None
    private_key: PemSource | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TLS certificate_chain and private_key must be given together (mutual TLS)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates, "root_certificates"),
            private_key=_pem(self.private_key, "private_key"),
            certificate_chain=_pem(self.certificate_chain, "certificate_chain"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def addresses(target: str | Sequence[str]) -> list[str]:
    """The sidecar addresses a Worker or Client was given: one "host:port", several
    separated by commas ("h1:p1,h2:p2", as CARSVC_TARGET may hold them), or a list."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    found = [part.strip() for part in parts if part.strip()]
    if not found:
        raise ValueError(f"no sidecar address in {target!r}: give host:port, or several separated by commas")
    return found


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying `token`, or None without one."""
    return None if token is None else (("authorization", f"Bearer {check_token(token)}"),)


class _BearerToken:
    """Adds the bearer token to every call that does not carry its own
    `authorization` metadata. grpc.aio files an interceptor under the first of
    the four kinds it is an instance of, so each kind has its own class."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in metadata:
            metadata.add("authorization", self._value)
        return details._replace(metadata=metadata)


class _UnaryUnary(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_BearerToken, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


# The sidecar's default max_message_bytes: the SDK sends and accepts as much.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The first wait between connection attempts after one fails.
INITIAL_RECONNECT_BACKOFF_S = 0.1


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    reconnect_max_delay: float = 5.0,
    options: list[tuple[str, Any]] | None = None,
) -> list[tuple[str, Any]]:
    """The SDK's channel arguments, then `options` (which win over them).

    gRPC's own reconnect backoff (1 s growing to 120 s) decides when a channel
    tries to connect again, whatever its owner's retry loop does, and channels
    to one target share their connections, and so that backoff, through the
    global subchannel pool. Here each channel has its own pool and a backoff
    from INITIAL_RECONNECT_BACKOFF_S capped at `reconnect_max_delay`, so a
    sidecar that comes back is reached within the SDK's documented cap."""
    chosen: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.use_local_subchannel_pool": 1,
        "grpc.initial_reconnect_backoff_ms": int(min(INITIAL_RECONNECT_BACKOFF_S, reconnect_max_delay) * 1000),
        "grpc.max_reconnect_backoff_ms": max(1, int(reconnect_max_delay * 1000)),
    }
    chosen.update(dict(options or []))
    return list(chosen.items())


def open_channel(
    target: str,
    *,
    token: str | None = None,
    tls: TLS | bool | None = None,
    options: list[tuple[str, Any]] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    reconnect_max_delay: float = 5.0,
) -> grpc.aio.Channel:
    """A channel to the sidecar: plaintext unless `tls` (True: TLS with the
    system's roots), with `token` on every call when given, sending and
    accepting messages up to `max_message_bytes`, and trying to reconnect at
    least every `reconnect_max_delay` seconds while the sidecar is away.
    `options` are extra gRPC channel arguments (they win over these)."""
    interceptors = None
    if token is not None:
        check_token(token)
        interceptors = [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    options = channel_options(
        max_message_bytes=max_message_bytes, reconnect_max_delay=reconnect_max_delay, options=options
    )
    if tls is None or tls is False:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    config = TLS() if tls is True else tls
    return grpc.aio.secure_channel(
        target, config.credentials(), options=[*config.channel_options(), *options], interceptors=interceptors
    )
