"""Raw grpcio-asyncio baseline: bidirectional-streaming echo, no generated code.

This is the floor every carsvc streaming figure is compared against: the cost of
grpcio + asyncio + uvloop alone, with no protobuf, no carsvc code and no
interceptors. The echo service is registered through a generic handler with
identity (bytes) serializers, the server runs on uvloop in a separate process
bound to 127.0.0.1 on an ephemeral port, and the client measures over loopback:

* ping-pong: one message out, wait for its echo, repeat, on one stream
  (round trips/s, p50 and p99 latency);
* pipelined: up to ``--window`` (default 64) messages in flight on one stream
  (messages/s).

Each mode is warmed up, then run ``--runs`` times; the table gives the median and,
in brackets, the min and max over the runs. Every run is bounded both by a
message count and by ``--max-seconds``. CPU per message is the process CPU time
(user + system, all threads) of the client and of the server divided by the
messages echoed.

Run from the repository root::

    python -m bench.raw_grpc                  # ~20 s
    python -m bench.raw_grpc --quick          # a few seconds, smoke only
    python -m bench.raw_grpc --json bench/results/raw_grpc.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import uvloop

SERVICE = "carsvc.bench.RawEcho"
METHOD = "Echo"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
READY_PREFIX = "PORT "
# Plain loopback TCP, no port sharing with anything else on the machine.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]


# --------------------------------------------------------------------------- server


async def _echo(request_iterator: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        yield message


async def _serve(out: TextIO) -> None:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(_echo, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port: int = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out.write(f"{READY_PREFIX}{port} {grpc.__version__}\n")
    out.flush()

    # Stop when the parent closes our stdin (or dies): no orphaned servers.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, name="stdin-eof", daemon=True).start()
    await stop.wait()
    await server.stop(grace=None)


def serve_main() -> None:
    """Entry point of the server process."""
    uvloop.run(_serve(sys.stdout))


class ServerProcess:
    """The echo server in a child process: by default the same interpreter (same grpcio);
    another interpreter (``--server-python``) lets one grpcio serve another's client."""

    def __init__(self, python: str | None = None, timeout: float = 20.0) -> None:
        self._proc = subprocess.Popen(
            [python or sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._readline(timeout)
        if not line.startswith(READY_PREFIX):
            self.close()
            raise RuntimeError(f"server did not start: {line!r}")
        port, self.grpcio = line[len(READY_PREFIX) :].split()
        self.port = int(port)
        self.pid = self._proc.pid

    def _readline(self, timeout: float) -> str:
        stdout = self._proc.stdout
        assert stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0].strip() if result else ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        # After the ")" field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- client


@dataclass
class PingPongRun:
    round_trips: int
    seconds: float
    rt_per_s: float
    p50_us: float
    p99_us: float
    client_cpu_us_per_msg: float
    server_cpu_us_per_msg: float


@dataclass
class PipelinedRun:
    messages: int
    seconds: float
    msgs_per_s: float
    client_cpu_us_per_msg: float
    server_cpu_us_per_msg: float


@dataclass
class Config:
    payload: int = 200
    runs: int = 7
    pingpong_count: int = 5000
    pipelined_count: int = 10000
    window: int = 64
    max_seconds: float = 1.5
    warmup_count: int = 2000
    server_python: str | None = None


@dataclass
class Results:
    config: Config
    machine: dict[str, Any]
    pingpong: list[PingPongRun] = field(default_factory=list)
    pipelined: list[PipelinedRun] = field(default_factory=list)


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values))))
    return float(sorted_values[rank - 1])


class _Cpu:
    def __init__(self, server: ServerProcess) -> None:
        self._server = server
        self._client0 = time.process_time()
        self._server0 = server.cpu_seconds()

    def per_message_us(self, messages: int) -> tuple[float, float]:
        client = time.process_time() - self._client0
        server = self._server.cpu_seconds() - self._server0
        n = max(messages, 1)
        return client / n * 1e6, server / n * 1e6


async def _check_ok(call: Any) -> None:
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise RuntimeError(f"echo stream ended with {code}: {await call.details()}")


async def _pingpong(stub: Any, server: ServerProcess, payload: bytes, count: int, max_seconds: float) -> PingPongRun:
    call = stub()
    # Open the stream (headers, first message) outside the timed loop.
    await call.write(payload)
    assert await call.read() == payload
    latencies: list[int] = []
    append = latencies.append
    clock = time.perf_counter_ns
    deadline = clock() + int(max_seconds * 1e9)
    cpu = _Cpu(server)
    start = clock()
    now = start
    while len(latencies) < count and now < deadline:
        t0 = clock()
        await call.write(payload)
        await call.read()
        now = clock()
        append(now - t0)
    elapsed = (now - start) / 1e9
    client_cpu, server_cpu = cpu.per_message_us(len(latencies))
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    await _check_ok(call)
    latencies.sort()
    return PingPongRun(
        round_trips=len(latencies),
        seconds=elapsed,
        rt_per_s=len(latencies) / elapsed,
        p50_us=_percentile(latencies, 0.50) / 1e3,
        p99_us=_percentile(latencies, 0.99) / 1e3,
        client_cpu_us_per_msg=client_cpu,
        server_cpu_us_per_msg=server_cpu,
    )


async def _pipelined(
    stub: Any, server: ServerProcess, payload: bytes, count: int, window: int, max_seconds: float
) -> PipelinedRun:
    call = stub()
    await call.write(payload)
    assert await call.read() == payload
    credits = asyncio.Semaphore(window)
    deadline = time.perf_counter() + max_seconds

    async def writer() -> None:
        for _ in range(count):
            await credits.acquire()
            if time.perf_counter() >= deadline:
                break
            await call.write(payload)
        await call.done_writing()

    cpu = _Cpu(server)
    start = time.perf_counter()
    write_task = asyncio.create_task(writer())
    received = 0
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            break
        received += 1
        credits.release()
    elapsed = time.perf_counter() - start
    client_cpu, server_cpu = cpu.per_message_us(received)
    await write_task
    await _check_ok(call)
    return PipelinedRun(
        messages=received,
        seconds=elapsed,
        msgs_per_s=received / elapsed,
        client_cpu_us_per_msg=client_cpu,
        server_cpu_us_per_msg=server_cpu,
    )


def machine_facts() -> dict[str, Any]:
    return {
        "grpcio": grpc.__version__,
        "uvloop": importlib.metadata.version("uvloop"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


async def run_benchmark(cfg: Config, progress: Callable[[str], None]) -> Results:
    results = Results(config=cfg, machine=machine_facts())
    payload = b"x" * cfg.payload
    with ServerProcess(cfg.server_python) as server:
        results.machine["server_grpcio"] = server.grpcio
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
            stub = channel.stream_stream(FULL_METHOD, request_serializer=None, response_deserializer=None)
            progress("warm-up")
            await _pingpong(stub, server, payload, cfg.warmup_count, cfg.max_seconds)
            await _pipelined(stub, server, payload, cfg.warmup_count, cfg.window, cfg.max_seconds)
            for i in range(cfg.runs):
                progress(f"run {i + 1}/{cfg.runs}")
                results.pingpong.append(await _pingpong(stub, server, payload, cfg.pingpong_count, cfg.max_seconds))
                results.pipelined.append(
                    await _pipelined(stub, server, payload, cfg.pipelined_count, cfg.window, cfg.max_seconds)
                )
    return results


# --------------------------------------------------------------------------- report


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(results: Results) -> dict[str, dict[str, float]]:
    pp, pl = results.pingpong, results.pipelined
    return {
        "pingpong_rt_per_s": _stats([r.rt_per_s for r in pp]),
        "pingpong_p50_us": _stats([r.p50_us for r in pp]),
        "pingpong_p99_us": _stats([r.p99_us for r in pp]),
        "pingpong_client_cpu_us_per_rt": _stats([r.client_cpu_us_per_msg for r in pp]),
        "pingpong_server_cpu_us_per_rt": _stats([r.server_cpu_us_per_msg for r in pp]),
        "pipelined_msgs_per_s": _stats([r.msgs_per_s for r in pl]),
        "pipelined_client_cpu_us_per_msg": _stats([r.client_cpu_us_per_msg for r in pl]),
        "pipelined_server_cpu_us_per_msg": _stats([r.server_cpu_us_per_msg for r in pl]),
    }


def format_table(results: Results, summary: dict[str, dict[str, float]]) -> str:
    m, c = results.machine, results.config
    rows = [
        ("ping-pong round trips/s", "pingpong_rt_per_s", "{:,.0f}"),
        ("ping-pong p50 latency (µs)", "pingpong_p50_us", "{:,.1f}"),
        ("ping-pong p99 latency (µs)", "pingpong_p99_us", "{:,.1f}"),
        ("ping-pong client CPU (µs/rt)", "pingpong_client_cpu_us_per_rt", "{:,.1f}"),
        ("ping-pong server CPU (µs/rt)", "pingpong_server_cpu_us_per_rt", "{:,.1f}"),
        (f"{c.window} in flight msgs/s", "pipelined_msgs_per_s", "{:,.0f}"),
        (f"{c.window} in flight client CPU (µs/msg)", "pipelined_client_cpu_us_per_msg", "{:,.1f}"),
        (f"{c.window} in flight server CPU (µs/msg)", "pipelined_server_cpu_us_per_msg", "{:,.1f}"),
    ]
    server = "" if m["server_grpcio"] == m["grpcio"] else f" (server {m['server_grpcio']})"
    header = (
        f"raw grpc.aio bidi echo: grpcio {m['grpcio']}{server}, uvloop {m['uvloop']}, "
        f"Python {m['python']}, {m['nproc']} CPUs, payload {c.payload} B, "
        f"{c.runs} runs (median [min, max])"
    )
    width = max(len(r[0]) for r in rows)
    lines = [header, "-" * len(header)]
    for label, key, fmt in rows:
        s = summary[key]
        lines.append(
            f"{label:<{width}}  {fmt.format(s['median']):>10}  [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m bench.raw_grpc",
        description="Raw grpcio-asyncio bidi-streaming echo baseline (loopback, uvloop).",
    )
    p.add_argument("--payload", type=int, default=d.payload, help="message size in bytes")
    p.add_argument("--runs", type=int, default=d.runs, help="measured runs per mode (>=1)")
    p.add_argument("--count", type=int, default=d.pingpong_count, help="round trips per run")
    p.add_argument("--pipelined-count", type=int, default=d.pipelined_count, help="messages per pipelined run")
    p.add_argument("--window", type=int, default=d.window, help="messages in flight")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="time cap of each run")
    p.add_argument("--warmup", type=int, default=d.warmup_count, help="warm-up messages per mode")
    p.add_argument(
        "--server-python",
        metavar="PATH",
        help="interpreter for the server process (default: this one), to tell client from "
        "server costs across grpcio versions",
    )
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--json", metavar="PATH", type=Path, help="also write results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config(
        payload=args.payload,
        runs=args.runs,
        pingpong_count=args.count,
        pipelined_count=args.pipelined_count,
        window=args.window,
        max_seconds=args.max_seconds,
        warmup_count=args.warmup,
        server_python=args.server_python,
    )
    if args.quick:
        cfg.runs = min(cfg.runs, 3)
        cfg.pingpong_count = min(cfg.pingpong_count, 500)
        cfg.pipelined_count = min(cfg.pipelined_count, 1000)
        cfg.warmup_count = min(cfg.warmup_count, 200)
        cfg.max_seconds = min(cfg.max_seconds, 0.3)
    if cfg.runs < 1 or cfg.window < 1 or cfg.payload < 0 or cfg.max_seconds <= 0:
        raise SystemExit("--runs and --window must be >= 1, --payload >= 0, --max-seconds > 0")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_main()
        return 0
    cfg = config_from_args(args)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[raw_grpc] {msg}", file=sys.stderr, flush=True)

    results = uvloop.run(run_benchmark(cfg, progress))
    summary = summarize(results)
    print(format_table(results, summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"summary": summary, **asdict(results)}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
