"""The `carsvc` command: serve, demo, version."""

from __future__ import annotations

import argparse
import logging
import sys

from carsvc._version import __version__
from carsvc.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsvc", description="Multi-agent coordination sidecar (gRPC).")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the sidecar", description="Run the sidecar. Every flag also reads CARSVC_<NAME>."
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, env CARSVC_HOST)")
    serve.add_argument("--port", type=int, help="port to bind, 0 for any (default 50051, env CARSVC_PORT)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ... (default INFO)")
    serve.add_argument("--log-format", choices=("text", "json"), help="text (default) or json, one object per line")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default off)")
    serve.add_argument("--data-dir", help="journal state, runs and events here so a restart recovers them")
    serve.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_s", help="seconds (default 10)")
    serve.add_argument("--heartbeat-interval-ms", type=int, help="worker heartbeat interval (default 5000)")
    serve.add_argument("--max-message-bytes", type=int, help="largest gRPC message (default 16 MiB)")
    security = serve.add_argument_group(
        "authentication and TLS",
        "See docs/configuration.md. Token values are read from files or from CARSVC_WORKER_TOKENS / "
        "CARSVC_CLIENT_TOKENS, never from flags (the command line is visible to every local user).",
    )
    security.add_argument("--worker-tokens-file", metavar="PATH", help="worker tokens, one per line")
    security.add_argument("--client-tokens-file", metavar="PATH", help="client tokens, one per line")
    security.add_argument("--tls-cert-file", metavar="PATH", help="the server's PEM certificate chain")
    security.add_argument("--tls-key-file", metavar="PATH", help="the server's PEM private key")
    security.add_argument(
        "--tls-client-ca-file", metavar="PATH", help="PEM CA that signs client certificates (mutual TLS)"
    )
    demo = commands.add_parser("demo", help="run a self-contained map-reduce demo and exit")
    demo.add_argument("--items", type=int, default=12, help="items to map (default 12)")
    commands.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"carsvc {__version__}")
        return 0
    if args.command == "demo":
        import asyncio

        from carsvc.demo import demo

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return asyncio.run(demo(args.items))
    from carsvc.security.server import ServerSecurity

    try:
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            log_format=args.log_format,
            metrics_port=args.metrics_port,
            data_dir=args.data_dir,
            shutdown_grace_s=args.shutdown_grace_s,
            heartbeat_interval_ms=args.heartbeat_interval_ms,
            max_message_bytes=args.max_message_bytes,
            worker_tokens_file=args.worker_tokens_file,
            client_tokens_file=args.client_tokens_file,
            tls_cert_file=args.tls_cert_file,
            tls_key_file=args.tls_key_file,
            tls_client_ca_file=args.tls_client_ca_file,
        )
        security = ServerSecurity.from_settings(settings)  # reads the token and TLS files
    except ValueError as err:
        print(f"carsvc: {err}", file=sys.stderr)
        return 2
    from carsvc.logs import configure

    configure(settings.log_level, settings.log_format)
    import uvloop

    from carsvc.server import serve

    try:
        uvloop.run(serve(settings, security))
    except OSError as err:
        print(f"carsvc: {err}", file=sys.stderr)
        return 1
    return 0
