"""What every operator command shares: the connection options (the SDK's token and
TLS), running a command against a Client, errors as one line, JSON lines and text
columns."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

# grpc and the generated code are imported when a command runs, not when `carsvc`
# builds its parser (`carsvc version`, `carsvc serve --help` stay quick).
if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message

    from carsvc._proto.car.v1 import types_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Exit codes: 0 done; 1 the sidecar refused the call (or could not be reached);
# 2 the command line or a local file is wrong; 3 a watched run ended without
# succeeding; 130 interrupted (Ctrl-C).
EXIT_CALL_FAILED = 1
EXIT_USAGE = 2
EXIT_RUN_UNSUCCESSFUL = 3
EXIT_INTERRUPTED = 130

Command: TypeAlias = Callable[[Any, argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """A bad argument or an unreadable local file: one line, exit 2."""


def connection_options() -> argparse.ArgumentParser:
    """The options every operator command takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group(
        "connection",
        "The same token and TLS options as the SDK's Client. The token is read from a file or from "
        "CARSVC_CLIENT_TOKEN, never from a flag (every local user can read a command line).",
    )
    group.add_argument(
        "--address", metavar="HOST:PORT", help=f"the sidecar (default {DEFAULT_ADDRESS}, env CARSVC_ADDRESS)"
    )
    group.add_argument(
        "--token-file", metavar="PATH", help="a file holding a client token (env CARSVC_CLIENT_TOKEN_FILE)"
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    group.add_argument("--tls-ca-file", metavar="PATH", help="PEM CA that signed the sidecar's certificate (TLS)")
    group.add_argument("--tls-cert-file", metavar="PATH", help="this client's PEM certificate (mutual TLS)")
    group.add_argument("--tls-key-file", metavar="PATH", help="this client's PEM private key (mutual TLS)")
    group.add_argument("--tls-server-name", metavar="NAME", help="the name to check in the sidecar's certificate")
    common.add_argument("--json", action="store_true", help="print one JSON object per line")
    return common


def address_of(args: argparse.Namespace) -> str:
    return str(args.address or os.environ.get("CARSVC_ADDRESS") or DEFAULT_ADDRESS)


def token_of(args: argparse.Namespace) -> str | None:
    """The client token: --token-file, else CARSVC_CLIENT_TOKEN_FILE, else CARSVC_CLIENT_TOKEN."""
    from carsvc.security.tokens import check_token, read_token_file

    path = args.token_file or os.environ.get("CARSVC_CLIENT_TOKEN_FILE")
    try:
        if path:
            return read_token_file(path, "--token-file" if args.token_file else "CARSVC_CLIENT_TOKEN_FILE")[0]
        token = os.environ.get("CARSVC_CLIENT_TOKEN")
        return check_token(token, "CARSVC_CLIENT_TOKEN") if token else None
    except ValueError as err:
        raise UsageError(str(err)) from None


def tls_of(args: argparse.Namespace) -> Any:
    """A carsvc.security.TLS when any TLS option is given, else None (plaintext)."""
    from carsvc.security.channel import TLS

    files = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    if not (args.tls or args.tls_server_name or any(files)):
        return None
    for flag, path in zip(("--tls-ca-file", "--tls-cert-file", "--tls-key-file"), files, strict=True):
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag} {path!r} is not a readable file")
    try:
        return TLS(
            root_certificates=args.tls_ca_file,
            certificate_chain=args.tls_cert_file,
            private_key=args.tls_key_file,
            server_name=args.tls_server_name,
        )
    except ValueError as err:
        raise UsageError(f"{err} (--tls-cert-file and --tls-key-file)") from None


def error_line(err: grpc.aio.AioRpcError, address: str) -> str:
    """A refused call as one line: the status name and the sidecar's message."""
    import grpc
    details = " ".join((err.details() or "").split())
    line = f"{err.code().name}: {details}" if details else err.code().name
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        line += f" (is the sidecar running at {address}?)"
    return line


def execute(command: Command, args: argparse.Namespace) -> int:
    """Runs `command(client, args)` against the sidecar; every failure is one
    line on stderr and an exit code."""
    import asyncio

    import grpc

    from carsvc.client import Client

    address = address_of(args)

    async def go() -> int:
        async with Client(address, token=token_of(args), tls=tls_of(args)) as client:
            return await command(client, args)

    try:
        return asyncio.run(go())
    except UsageError as err:
        print(f"carsvc: {err}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.aio.AioRpcError as err:
        print(f"carsvc: {error_line(err, address)}", file=sys.stderr)
        return EXIT_CALL_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# -- output ---------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    """A message in proto3's JSON mapping, with the proto's field names and every
    field (zeros included); 64-bit integers are strings, as that mapping says."""
    from google.protobuf import json_format

    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def emit(obj: Message | dict[str, Any], out: TextIO | None = None) -> None:
    """One JSON object on one line."""
    data = obj if isinstance(obj, dict) else to_dict(obj)
    print(json.dumps(data, ensure_ascii=False, separators=(",", ":")), file=out or sys.stdout, flush=True)


def columns(header: Sequence[str], rows: Iterable[Sequence[str]], out: TextIO | None = None) -> None:
    """Rows of text in aligned columns under an upper-case header."""
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out or sys.stdout)


def status_name(status: int) -> str:
    """RUN_STATUS_RUNNING -> "running"."""
    from carsvc._proto.car.v1 import types_pb2

    return types_pb2.RunStatus.Name(status).removeprefix("RUN_STATUS_").lower()  # type: ignore[arg-type]


def parse_status(text: str) -> int:
    from carsvc._proto.car.v1 import types_pb2

    try:
        return types_pb2.RunStatus.Value("RUN_STATUS_" + text.upper())
    except ValueError:
        names = ", ".join(status_name(s) for s in types_pb2.RunStatus.values() if s)
        raise argparse.ArgumentTypeError(f"{text!r} is not a run status ({names})") from None


def ago(unix_ms: int, now_ms: int | None = None) -> str:
    """How long ago, in the largest unit that fits: "4s ago", "12m ago", "3h ago", "2d ago"."""
    if not unix_ms:
        return "-"
    seconds = max(0, ((now_ms if now_ms is not None else int(time.time() * 1000)) - unix_ms) // 1000)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def when(unix_ms: int) -> str:
    """A local timestamp, or "-" for 0."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000)) if unix_ms else "-"


def budget_text(budget: types_pb2.BudgetSnapshot) -> str:
    """ "agents 3/10 · tokens 1,500 (in 1,200, out 300) · $0.0040 of $1.00 · exhausted"."""
    limits = budget.limits
    agents = f"agents {budget.agents_started:,}"
    if limits.HasField("max_agents"):
        agents += f"/{limits.max_agents:,}"
    if budget.agents_denied:
        agents += f" ({budget.agents_denied:,} denied)"
    tokens = f"tokens {budget.total_tokens:,}"
    if limits.HasField("max_total_tokens"):
        tokens += f"/{limits.max_total_tokens:,}"
    tokens += f" (in {budget.input_tokens:,}, out {budget.output_tokens:,})"
    cost = f"${budget.cost_usd:.4f}"
    if limits.HasField("max_cost_usd"):
        cost += f" of ${limits.max_cost_usd:.2f}"
    return " · ".join([agents, tokens, cost, *(["exhausted"] if budget.exhausted else [])])


def value_text(value: Any) -> str:
    """JSON-shaped data as compact JSON text."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def shorten(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"
