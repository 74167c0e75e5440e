"""The console's HTTP server: aiohttp on the sidecar's own event loop, serving
the HTTP/JSON API under /api/v1/ and the web console's files at /.

What guards it, outermost first:

* **Host and Origin.** Bound to a loopback address (the default), it answers
  only requests whose Host is a loopback name, so a web page whose name an
  attacker points at 127.0.0.1 (DNS rebinding) cannot reach it; an API request
  whose Origin is not the console's own is refused (another site's page in the
  operator's browser).
* **Client tokens** when authentication is on: every API request carries
  `Authorization: Bearer <client token>`, checked as the gRPC services check
  theirs; the console's own files are open (they hold no data).
* **Bounds**: a body up to max_message_bytes that arrives within
  receive_timeout_s, POST bodies only as application/json (a cross-site form
  cannot send one), and the bounds of the gRPC requests they become.
* TLS with the gRPC port's certificate and key when tls_cert_file is set
  (client certificates required with tls_client_ca_file).
"""

from __future__ import annotations

import importlib.resources
import logging
import ssl
from pathlib import PurePath

from aiohttp import web
from yarl import URL

from carsvc.config import Settings
from carsvc.domain.errors import shown
from carsvc.http.errors import Handler, error_response, json_errors
from carsvc.http.handlers import PREFIX, Api
from carsvc.security.auth import Scope
from carsvc.security.server import ServerSecurity, is_loopback

__all__ = ["Console"]

log = logging.getLogger("carsvc.http")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# How long open responses (event streams) get to finish when the sidecar stops.
SHUTDOWN_TIMEOUT_S = 1.0


def load_assets() -> dict[str, tuple[bytes, str]]:
    """The console's files (carsvc/http/static/, package data), by name."""
    assets = {}
    for entry in (importlib.resources.files(__package__) / "static").iterdir():
        kind = CONTENT_TYPES.get(PurePath(entry.name).suffix)
        if kind is not None and entry.is_file():
            assets[entry.name] = (entry.read_bytes(), kind)
    return assets


def loopback_name(host: str) -> bool:
    """Whether a Host header names this machine: localhost, *.localhost or a loopback address."""
    try:
        name = (URL(f"http://{host}").host or "").lower()
    except ValueError:
        return False
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def bearer(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Console:
    """The API and the console of one sidecar (`console_port`)."""

    def __init__(self, settings: Settings, security: ServerSecurity, api: Api) -> None:
        self.settings = settings
        self.security = security
        self.api = api
        self.assets = load_assets()
        self.loopback_only = is_loopback(settings.console_host)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert_file else "http"
        host = self.settings.console_host
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._guard, self._authenticate, json_errors],
            client_max_size=self.settings.max_message_bytes,
        )
        app.router.add_routes(self.api.routes())
        app.router.add_get("/", self._asset, allow_head=False)
        app.router.add_get("/assets/{name}", self._asset, allow_head=False)
        return app

    async def start(self) -> int:
        s = self.settings
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, s.console_host, s.console_port, ssl_context=self._ssl_context())
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._log_startup()
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_cert_file:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(s.tls_cert_file, s.tls_key_file)
        if s.tls_client_ca_file:
            context.load_verify_locations(cafile=s.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _log_startup(self) -> None:
        log.info("console on %s (API under %s/)", self.url, PREFIX)
        if self.loopback_only:
            return
        if not self.security.auth_enabled:
            log.warning(
                "the console binds %s, which is not a loopback address, WITHOUT authentication: anyone who "
                "can reach it can start and cancel runs, approve tool calls and read state. Configure client "
                "tokens or bind console_host to 127.0.0.1.",
                self.settings.console_host,
            )
        if not self.settings.tls_cert_file:
            log.warning("the console binds %s without TLS: tokens and data travel in clear text",
                        self.settings.console_host)

    # -- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.loopback_only and not loopback_name(request.host):
            return error_response(
                "PERMISSION_DENIED",
                f"the console answers loopback names only (console_host {self.settings.console_host}); "
                f"open it as http://127.0.0.1:{self.port}/",
                "Host",
                status=403,
            )
        origin = request.headers.get("Origin")
        if request.path.startswith("/api/") and origin is not None:
            _, _, authority = origin.partition("://")
            if authority.lower() != request.host.lower():
                return error_response(
                    "PERMISSION_DENIED", "cross-origin requests are refused", "Origin", status=403
                )
        response = await handler(request)
        if not response.prepared:
            response.headers.update(HEADERS)
        return response

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.security.auth_enabled or not request.path.startswith("/api/"):
            return await handler(request)
        header = request.headers.get("Authorization")
        token = bearer(header) if header is not None else None
        if token is None:
            reason = f"{shown(request.path)} needs an 'Authorization: Bearer <token>' header with a client token"
        elif self.security.tokens[Scope.CLIENT].contains(token):
            return await handler(request)
        else:
            reason = f"the bearer token is not a client token of this sidecar ({shown(request.path)} needs one)"
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, reason)
        response = error_response("UNAUTHENTICATED", reason, status=401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="carsvc"'
        return response

    # -- the console's files ---------------------------------------------------------------

    async def _asset(self, request: web.Request) -> web.Response:
        found = self.assets.get(request.match_info.get("name", "index.html"))
        if found is None:
            raise web.HTTPNotFound()
        body, kind = found
        return web.Response(body=body, headers={"Content-Type": kind, "Cache-Control": "no-cache"})
