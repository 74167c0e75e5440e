"""The AutoGen side of ``bench.autogen_baseline``: runs under the AutoGen venv's python.

This file imports autogen-core / autogen-ext, which are installed only in
``.bench/autogen-venv`` (see ``bench/autogen_baseline.py``), never in carsvc's own
environment. It is started as a script (``python -I bench/autogen_runtime.py ROLE ...``),
never imported, and is excluded from mypy in pyproject.toml for that reason.

Roles, one per process:

``host``
    ``GrpcWorkerAgentRuntimeHost`` on 127.0.0.1 and a free port. Prints
    ``READY <port> <versions as JSON>``.
``worker HOST:PORT``
    ``GrpcWorkerAgentRuntime`` connected to the host, hosting the agent type
    ``echo`` (a ``RoutedAgent`` that returns the request it gets). Prints ``READY``.
``client HOST:PORT CONFIG_JSON``
    ``GrpcWorkerAgentRuntime`` with no agents that measures ``send_message`` to the
    echo agent (which goes client -> host -> worker -> host -> client). Prints
    ``PROGRESS <text>`` lines and finally ``RESULT <JSON>``.

Every role stops when its stdin reaches EOF: the parent closes it when done, and the
kernel closes it when the parent dies, so no process outlives the benchmark.
Nothing is printed to stdout except the protocol lines above; errors go to stderr
with a non-zero exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import math
import platform
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from autogen_core import AgentId, MessageContext, RoutedAgent, message_handler, try_get_known_serializers_for_type
from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime, GrpcWorkerAgentRuntimeHost

ECHO_TYPE = "echo"
ECHO_AGENT = AgentId(ECHO_TYPE, "default")
# Plain loopback TCP: the host's port is not shared with any other socket.
GRPC_OPTIONS: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
STOP_TIMEOUT = 10.0


@dataclass
class Echo:
    """The request and the reply: one string field (JSON-serialized by AutoGen)."""

    text: str


class EchoAgent(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("echoes every Echo it receives")

    @message_handler
    async def on_echo(self, message: Echo, ctx: MessageContext) -> Echo:
        return message


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stdin_eof(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set when stdin reaches EOF (parent closed it, or died)."""
    eof = asyncio.Event()

    def wait() -> None:
        with contextlib.suppress(Exception):
            sys.stdin.read()
        loop.call_soon_threadsafe(eof.set)

    threading.Thread(target=wait, name="stdin-eof", daemon=True).start()
    return eof


def versions() -> dict[str, str]:
    found = {name: importlib.metadata.version(name) for name in ("autogen-core", "autogen-ext", "grpcio", "protobuf")}
    found["python"] = platform.python_version()
    return found


# --------------------------------------------------------------------------- host


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _wait_serving(address: str, timeout: float) -> None:
    import grpc  # the host's own grpcio, installed with autogen-ext[grpc]

    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout)


async def run_host() -> None:
    # GrpcWorkerAgentRuntimeHost does not report the port it bound, so "127.0.0.1:0"
    # is of no use: take a free port, and try another if it was taken meanwhile.
    host: GrpcWorkerAgentRuntimeHost | None = None
    for attempt in range(5):
        address = f"127.0.0.1:{_free_port()}"
        try:
            host = GrpcWorkerAgentRuntimeHost(address=address, extra_grpc_config=GRPC_OPTIONS)
            break
        except RuntimeError:
            if attempt == 4:
                raise
    assert host is not None
    eof = _stdin_eof(asyncio.get_running_loop())
    host.start()
    await _wait_serving(address, timeout=20)
    _emit(f"READY {address.rsplit(':', 1)[1]} {json.dumps(versions())}")
    await eof.wait()
    await host.stop(grace=1)


# --------------------------------------------------------------------------- worker


async def _stop_runtime(runtime: GrpcWorkerAgentRuntime) -> None:
    with contextlib.suppress(Exception, TimeoutError):
        await asyncio.wait_for(runtime.stop(), STOP_TIMEOUT)


async def run_worker(host_address: str) -> None:
    eof = _stdin_eof(asyncio.get_running_loop())
    runtime = GrpcWorkerAgentRuntime(host_address=host_address, extra_grpc_config=GRPC_OPTIONS)
    await runtime.start()
    try:
        runtime.add_message_serializer(try_get_known_serializers_for_type(Echo))
        await EchoAgent.register(runtime, ECHO_TYPE, EchoAgent)
        # RegisterAgent is a unary call the host has answered: requests to "echo" now route here.
        _emit("READY")
        await eof.wait()
    finally:
        await _stop_runtime(runtime)


# --------------------------------------------------------------------------- client


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (as in bench/raw_grpc.py)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values))))
    return float(sorted_values[rank - 1])


async def _sequential(runtime: GrpcWorkerAgentRuntime, text: str, count: int, max_seconds: float) -> dict[str, Any]:
    """One request at a time: send, await the reply, repeat."""
    message = Echo(text)
    latencies: list[int] = []
    append = latencies.append
    clock = time.perf_counter_ns
    deadline = clock() + int(max_seconds * 1e9)
    start = now = clock()
    while len(latencies) < count and now < deadline:
        t0 = clock()
        reply = await runtime.send_message(message, ECHO_AGENT)
        now = clock()
        append(now - t0)
        if not isinstance(reply, Echo) or reply.text != text:
            raise RuntimeError(f"bad echo reply: {reply!r}")
    elapsed = (now - start) / 1e9
    latencies.sort()
    return {
        "round_trips": len(latencies),
        "seconds": elapsed,
        "rt_per_s": len(latencies) / elapsed,
        "p50_us": _percentile(latencies, 0.50) / 1e3,
        "p99_us": _percentile(latencies, 0.99) / 1e3,
    }


async def _concurrent(
    runtime: GrpcWorkerAgentRuntime, text: str, count: int, concurrency: int, max_seconds: float
) -> dict[str, Any]:
    """``concurrency`` lanes, each with one request outstanding: that many in flight."""
    message = Echo(text)
    issued = 0
    answered = 0
    clock = time.perf_counter
    deadline = clock() + max_seconds

    async def lane() -> None:
        nonlocal issued, answered
        while issued < count and clock() < deadline:
            issued += 1
            reply = await runtime.send_message(message, ECHO_AGENT)
            if not isinstance(reply, Echo) or reply.text != text:
                raise RuntimeError(f"bad echo reply: {reply!r}")
            answered += 1

    start = clock()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = clock() - start
    return {"messages": answered, "seconds": elapsed, "msgs_per_s": answered / elapsed}


async def _bounded(what: str, coro: Awaitable[dict[str, Any]], max_seconds: float) -> dict[str, Any]:
    # A lost reply would leave send_message waiting forever (AutoGen has no timeout there).
    limit = max_seconds + 30.0
    try:
        return await asyncio.wait_for(coro, limit)
    except TimeoutError:
        raise RuntimeError(f"{what} did not finish within {limit:.0f} s (echo replies lost?)") from None


async def _measure(runtime: GrpcWorkerAgentRuntime, cfg: dict[str, Any]) -> dict[str, Any]:
    text = "x" * int(cfg["payload"])
    max_seconds = float(cfg["max_seconds"])
    concurrency = int(cfg["concurrency"])

    def sequential(count: int) -> Awaitable[dict[str, Any]]:
        return _bounded("sequential run", _sequential(runtime, text, count, max_seconds), max_seconds)

    def concurrent(count: int) -> Awaitable[dict[str, Any]]:
        return _bounded("concurrent run", _concurrent(runtime, text, count, concurrency, max_seconds), max_seconds)

    _emit("PROGRESS warm-up")
    await sequential(int(cfg["warmup_count"]))
    await concurrent(int(cfg["warmup_count"]))
    result: dict[str, Any] = {"sequential": [], "concurrent": []}
    runs = int(cfg["runs"])
    for i in range(runs):
        _emit(f"PROGRESS run {i + 1}/{runs}")
        result["sequential"].append(await sequential(int(cfg["sequential_count"])))
        result["concurrent"].append(await concurrent(int(cfg["concurrent_count"])))
    return result


async def run_client(host_address: str, cfg: dict[str, Any]) -> None:
    eof = _stdin_eof(asyncio.get_running_loop())
    runtime = GrpcWorkerAgentRuntime(host_address=host_address, extra_grpc_config=GRPC_OPTIONS)
    await runtime.start()
    try:
        runtime.add_message_serializer(try_get_known_serializers_for_type(Echo))
        measure = asyncio.ensure_future(_measure(runtime, cfg))
        stop = asyncio.ensure_future(eof.wait())
        await asyncio.wait({measure, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not measure.done():
            measure.cancel()
            raise SystemExit("stdin closed: parent gone, measurement abandoned")
        stop.cancel()
        _emit("RESULT " + json.dumps(measure.result()))
    finally:
        await _stop_runtime(runtime)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str]) -> int:
    roles: dict[str, tuple[int, Callable[..., Awaitable[None]]]] = {
        "host": (0, run_host),
        "worker": (1, run_worker),
        "client": (2, run_client),
    }
    if not argv or argv[0] not in roles or len(argv) - 1 != roles[argv[0]][0]:
        print("usage: autogen_runtime.py host | worker HOST:PORT | client HOST:PORT CONFIG_JSON", file=sys.stderr)
        return 2
    role, args = argv[0], list(argv[1:])
    params: list[Any] = args if role != "client" else [args[0], json.loads(args[1])]
    asyncio.run(roles[role][1](*params))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
