"""The sidecar's security settings, loaded and checked once at startup:
token sets per scope, TLS credentials, and the warnings an operator must see."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass

import grpc

from carsvc.config import Settings
from carsvc.security.auth import Scope, TokenAuthInterceptor
from carsvc.security.tokens import SHORT_TOKEN, TokenSet, parse_token_list, read_token_file

__all__ = ["ServerSecurity", "is_loopback"]

log = logging.getLogger("carsvc.security")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the sidecar reachable from this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name, "" or a wildcard: assume reachable


def _read_pem(path: str, setting: str, what: str, marker: bytes) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"{setting} {path!r} cannot be read: {err.strerror or err}") from None
    if marker not in data:
        raise ValueError(f"{setting} {path!r} holds no PEM {what}")
    return data


def _check_tls_files(cert: str, key: str, client_ca: str) -> None:
    """Parses the TLS files with the standard library's OpenSSL, so a broken
    certificate, a key that does not match it, or a bad CA file stops the
    sidecar with a clear message (grpc would only fail to bind the port)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key gets an empty password instead of a terminal prompt.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as err:
        raise ValueError(
            f"tls_cert_file {cert!r} and tls_key_file {key!r} are not a certificate chain and its "
            f"unencrypted private key: {err.reason or err}"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as err:
            raise ValueError(
                f"tls_client_ca_file {client_ca!r} is not a PEM CA certificate: {err.reason or err}"
            ) from None


_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8, RSA or EC


def _tokens(settings: Settings, scope: Scope) -> tuple[list[str], int]:
    """The scope's tokens from its file and its environment list, and how many are short."""
    file_setting, list_setting = f"{scope.value}_tokens_file", f"{scope.value}_tokens"
    tokens: list[str] = []
    path: str = getattr(settings, file_setting)
    if path:
        tokens += read_token_file(path, file_setting)
    tokens += parse_token_list(getattr(settings, list_setting), f"CARSVC_{list_setting.upper()}")
    return tokens, sum(len(t) < SHORT_TOKEN for t in tokens)


@dataclass(frozen=True, repr=False)
class ServerSecurity:
    """What `Sidecar` needs to authenticate callers and encrypt connections.

    `from_settings` raises ValueError (the CLI exits 2) for an unreadable or
    empty token file, a malformed token, tokens for one scope only, a token in
    both scopes, or an unreadable or non-PEM TLS file."""

    tokens: dict[Scope, TokenSet]
    credentials: grpc.ServerCredentials | None = None
    mutual_tls: bool = False
    short_tokens: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerSecurity:
        settings.validate()
        worker, short_worker = _tokens(settings, Scope.WORKER)
        client, short_client = _tokens(settings, Scope.CLIENT)
        if bool(worker) != bool(client):
            have, missing = ("worker", "client") if worker else ("client", "worker")
            raise ValueError(
                f"{have} tokens are configured but {missing} tokens are not: authentication covers "
                f"both scopes, set {missing}_tokens_file or CARSVC_{missing.upper()}_TOKENS too"
            )
        tokens = {Scope.WORKER: TokenSet(worker), Scope.CLIENT: TokenSet(client)}
        if tokens[Scope.WORKER].overlaps(tokens[Scope.CLIENT]):
            raise ValueError("a token is both a worker and a client token: the scopes need different tokens")
        credentials = None
        if settings.tls_cert_file:
            chain = _read_pem(settings.tls_cert_file, "tls_cert_file", "certificate", _CERTIFICATE)
            key = _read_pem(settings.tls_key_file, "tls_key_file", "private key", _PRIVATE_KEY)
            client_ca = None
            if settings.tls_client_ca_file:
                client_ca = _read_pem(settings.tls_client_ca_file, "tls_client_ca_file", "certificate", _CERTIFICATE)
            _check_tls_files(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            credentials = grpc.ssl_server_credentials(
                [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
        return cls(
            tokens=tokens,
            credentials=credentials,
            mutual_tls=bool(settings.tls_client_ca_file),
            short_tokens=short_worker + short_client,
        )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens[Scope.WORKER])

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The server interceptors to install (none when auth is off: no cost per call)."""
        return [TokenAuthInterceptor(self.tokens)] if self.auth_enabled else []

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        """Adds the listening port (TLS when configured); returns the bound port."""
        if self.credentials is None:
            port: int = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, self.credentials)
        return port

    def describe(self) -> str:
        auth = (
            f"bearer tokens ({len(self.tokens[Scope.WORKER])} worker, {len(self.tokens[Scope.CLIENT])} client)"
            if self.auth_enabled
            else "off"
        )
        tls = "mutual TLS" if self.mutual_tls else "TLS" if self.credentials is not None else "off"
        return f"authentication {auth}, TLS {tls}"

    def log_startup(self, host: str) -> None:
        """Logs what is on, and warns about what exposes the sidecar."""
        log.info("carsvc security: %s", self.describe())
        if self.short_tokens:
            log.warning(
                "%d token(s) are shorter than %d characters: use long random tokens "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
                self.short_tokens,
                SHORT_TOKEN,
            )
        if is_loopback(host):
            return
        if not self.auth_enabled and not self.mutual_tls:
            log.warning(
                "carsvc binds %s, which is not a loopback address, WITHOUT authentication: anyone who can "
                "reach it can start runs, read state and serve agents. Configure worker and client tokens "
                "(docs/configuration.md, 'Authentication and TLS') or bind 127.0.0.1.",
                host,
            )
        elif not self.auth_enabled:
            log.warning(
                "carsvc binds %s with mutual TLS but without tokens: every holder of a client certificate "
                "may use every service, as a worker and as a client",
                host,
            )
        if self.credentials is None:
            log.warning(
                "carsvc binds %s without TLS: requests, results%s travel in clear text",
                host,
                " and bearer tokens" if self.auth_enabled else "",
            )
