"""The `carsvc` command: serve, config, demo, version."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from carsvc._version import __version__
from carsvc.commands import register as register_operator_commands
from carsvc.commands import run as run_operator_command
from carsvc.config import Settings, env_name, sources, unknown_variables

SETTINGS_HELP = (
    "Every setting is read from the environment variable CARSVC_<NAME> (its name in upper case; "
    "docs/configuration.md describes each), and the flags below override it. "
    "`carsvc config` lists every setting with its current value and where it comes from."
)
# Settings whose values are secrets: `carsvc config` says only how many there are.
SECRET_SETTINGS = ("worker_tokens", "client_tokens")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `carsvc serve` (and `carsvc config`); each dest is a setting's name."""
    parser.add_argument("--host", help="address to bind (default 127.0.0.1, env CARSVC_HOST)")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any (default 50051, env CARSVC_PORT)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ... (default INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), help="text (default) or json, one object per line")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default off)")
    parser.add_argument(
        "--console-port", type=int, help="serve the web console and HTTP/JSON API on this port (default off)"
    )
    parser.add_argument("--console-host", help="address the console binds (default 127.0.0.1)")
    parser.add_argument("--data-dir", help="journal state, runs and events here so a restart recovers them")
    parser.add_argument(
        "--backend", metavar="URL", help="redis://HOST:PORT/DB keeps runs, state and budgets in Redis (default: memory)"
    )
    parser.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_s", help="seconds (default 10)")
    parser.add_argument("--heartbeat-interval-ms", type=int, help="worker heartbeat interval (default 5000)")
    parser.add_argument("--max-message-bytes", type=int, help="largest gRPC message (default 16 MiB)")
    security = parser.add_argument_group(
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsvc", description="Multi-agent coordination sidecar (gRPC).")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar", description=f"Run the sidecar. {SETTINGS_HELP}")
    _add_setting_flags(serve)
    config = commands.add_parser(
        "config",
        help="print every setting with its current value and source",
        description="Print every setting with the value `carsvc serve` would use and where it comes from "
        "(default, env CARSVC_<NAME>, or command line); token values are not shown. Takes the flags of "
        "`carsvc serve`; exits 2 if a value is refused, as serve would.",
    )
    _add_setting_flags(config)
    config.add_argument("--json", action="store_true", help="one JSON object: setting -> {value, source, env}")
    demo = commands.add_parser("demo", help="run a self-contained map-reduce demo and exit")
    demo.add_argument("--items", type=int, default=12, help="items to map (default 12)")
    commands.add_parser("version", help="print the version")
    register_operator_commands(commands)  # runs, approve, deny, workers, state, budget (docs/cli.md)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (code := run_operator_command(args)) is not None:
        return code
    if args.command == "version":
        print(f"carsvc {__version__}")
        return 0
    if args.command == "demo":
        import asyncio

        from carsvc.demo import demo

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return asyncio.run(demo(args.items))
    overrides = _overrides(args)
    if args.command == "config":
        return _print_config(overrides, args.json)
    from carsvc.security.server import ServerSecurity

    try:
        settings = Settings.from_env(**overrides)
        security = ServerSecurity.from_settings(settings)  # reads the token and TLS files
    except ValueError as err:
        print(f"carsvc: {err}", file=sys.stderr)
        return 2
    from carsvc.logs import configure

    configure(settings.log_level, settings.log_format)
    for warning in unknown_variables():
        logging.getLogger("carsvc").warning("%s", warning)
    import uvloop

    from carsvc.server import AddressInUse, serve

    try:
        uvloop.run(serve(settings, security))
    except AddressInUse as err:
        print(f"carsvc: {err} (another sidecar? choose a port with --port or CARSVC_PORT)", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"carsvc: {err}", file=sys.stderr)
        return 1
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given)."""
    names = {f.name for f in dataclasses.fields(Settings)}
    return {name: value for name, value in vars(args).items() if name in names}


def _print_config(overrides: dict[str, Any], as_json: bool) -> int:
    for warning in unknown_variables():
        print(f"carsvc: warning: {warning}", file=sys.stderr)
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as err:
        print(f"carsvc: {err}", file=sys.stderr)
        return 2
    where = sources(**overrides)
    rows = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in SECRET_SETTINGS:
            value = f"({len([t for t in value.split(',') if t.strip()])} tokens)" if value else ""
        elif f.name == "backend":
            value = without_password(value)
        rows.append((f.name, value, where[f.name], env_name(f.name)))
    if as_json:
        print(json.dumps({name: {"value": value, "source": source, "env": env} for name, value, source, env in rows}))
        return 0
    width = max(len(name) for name, *_ in rows)
    shown = [(name, "''" if value == "" else str(value), source) for name, value, source, _ in rows]
    value_width = min(max(len(value) for _, value, _ in shown), 40)
    # One write: a reader that stops early (`| head`) gets no half table.
    sys.stdout.write("".join(f"{name:<{width}}  {value:<{value_width}}  {source}\n" for name, value, source in shown))
    return 0


def without_password(url: str) -> str:
    """A backend URL as it may be shown: its password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))
