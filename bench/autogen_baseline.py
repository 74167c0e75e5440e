"""AutoGen distributed-runtime baseline: request/response through AutoGen's gRPC host.

What carsvc is compared against here is Microsoft AutoGen's own cross-process
runtime as shipped: a ``GrpcWorkerAgentRuntimeHost`` (the router), a
``GrpcWorkerAgentRuntime`` hosting a trivial echo agent (a ``RoutedAgent`` whose
handler returns the message it got), and a second ``GrpcWorkerAgentRuntime`` with
no agents that measures ``send_message`` to the echo agent. Each is a separate
process bound to or connecting to 127.0.0.1 (the host on a free port), so every
request goes client -> host -> worker -> host -> client over loopback gRPC, with
AutoGen's JSON serialization of a dataclass message carrying a 200-character
string (the same 200 bytes as ``bench/raw_grpc.py``'s default payload). The
processes run AutoGen's default asyncio event loop, as AutoGen does.

Measured, after a warm-up, ``--runs`` times (default 7); the table gives the
median and, in brackets, the min and max over the runs. Each run is bounded both
by a message count and by ``--max-seconds``:

* sequential: one ``send_message`` at a time, awaiting its reply (round trips/s,
  p50 and p99 latency);
* concurrent: ``--concurrency`` (default 64) requests outstanding at all times
  (replies/s).

AutoGen runs in its own virtualenv, ``.bench/autogen-venv`` (made on first use,
reused while it holds the pinned versions; needs PyPI), because it brings its own
dependency set (pydantic, opentelemetry, pillow, ...) and pins its own grpcio
(autogen-ext[grpc] requires ``grpcio~=1.70.0``), none of which may leak into
carsvc's environment. The in-venv code is ``bench/autogen_runtime.py``, run as a
script by that venv's python. Pins (the newest releases on PyPI when written):

* ``autogen-core==0.7.5`` and ``autogen-ext[grpc]==0.7.5``: released together;
  0.7.x is the line with the gRPC worker runtime in ``autogen_ext.runtimes.grpc``;
* ``grpcio==1.70.0``: what autogen-ext's ``~=1.70.0`` resolves to today, pinned so a
  later 1.70.x cannot change the baseline silently. It is also carsvc's grpcio, so
  the gap to ``bench.raw_grpc`` is AutoGen's own cost, not a grpcio difference.

Run from the repository root::

    python -m bench.autogen_baseline                  # ~30 s (+ venv setup once)
    python -m bench.autogen_baseline --quick          # a few seconds, smoke only
    python -m bench.autogen_baseline --json bench/results/autogen.json

From the suite: ``run_baseline(Config(), progress)`` returns a JSON-able dict
(``summary``, ``versions``, ``machine``, ``config``, per-run details) or raises
``BaselineUnavailable`` with the reason (no network, pip failure, a child that
did not start) for an "n/a" cell.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

AUTOGEN_CORE = "0.7.5"
AUTOGEN_EXT = "0.7.5"
GRPCIO = "1.70.0"
PINS = {"autogen-core": AUTOGEN_CORE, "autogen-ext": AUTOGEN_EXT, "grpcio": GRPCIO}
REQUIREMENTS = (f"autogen-core=={AUTOGEN_CORE}", f"autogen-ext[grpc]=={AUTOGEN_EXT}", f"grpcio=={GRPCIO}")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".bench" / "autogen-venv"
RUNTIME_SCRIPT = Path(__file__).resolve().parent / "autogen_runtime.py"

START_TIMEOUT = 60.0  # a child's READY line (importing autogen takes a second or two)
PIP_TIMEOUT = 900.0
STOP_TIMEOUT = 15.0


class BaselineUnavailable(RuntimeError):
    """The AutoGen baseline cannot run here; ``str(exc)`` says why (show it as "n/a")."""


@dataclass
class Config:
    payload: int = 200
    runs: int = 7
    sequential_count: int = 5000
    concurrent_count: int = 10000
    concurrency: int = 64
    max_seconds: float = 1.5
    warmup_count: int = 2000
    venv: str = str(DEFAULT_VENV)


# --------------------------------------------------------------------------- venv


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _installed(python: Path) -> dict[str, str] | None:
    """Versions of the pinned distributions in that interpreter, None if it does not run."""
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        found[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(found))\n"
    )
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", probe, *PINS], capture_output=True, text=True, timeout=60, check=True
        )
        found: dict[str, str] = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return found


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two benchmark runs must not build the same venv at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_venv(venv: Path, progress: Callable[[str], None]) -> Path:
    """The venv's python, after creating the venv and installing the pins if needed."""
    python = _venv_python(venv)
    if _installed(python) == PINS:
        return python
    with _locked(venv.with_name(venv.name + ".lock")):
        if _installed(python) == PINS:  # built by another run while we waited
            return python
        if _installed(python) is None:
            if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
                raise BaselineUnavailable(f"{venv} exists and is not a virtualenv; not touching it")
            progress(f"creating {venv}")
            try:
                subprocess.run(
                    [sys.executable, "-m", "venv", "--clear", str(venv)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
            except subprocess.CalledProcessError as exc:
                raise BaselineUnavailable(f"could not create {venv}: {_tail(exc.stderr or exc.stdout)}") from exc
            except (OSError, subprocess.SubprocessError) as exc:
                raise BaselineUnavailable(f"could not create {venv}: {exc}") from exc
        progress(f"pip install {' '.join(REQUIREMENTS)} (into {venv})")
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--retries=2"]
        try:
            subprocess.run(
                [*pip, *REQUIREMENTS],
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT,
                check=True,
            )
        except subprocess.CalledProcessError as exc:
            raise BaselineUnavailable(
                f"pip could not install {', '.join(REQUIREMENTS)} into {venv} (is PyPI reachable?):\n"
                f"{_tail(exc.stderr or exc.stdout)}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise BaselineUnavailable(f"pip install into {venv} took over {PIP_TIMEOUT:.0f} s (network?)") from exc
        except OSError as exc:
            raise BaselineUnavailable(f"could not run pip in {venv}: {exc}") from exc
        found = _installed(python)
        if found != PINS:
            raise BaselineUnavailable(f"{venv} holds {found} after pip install, expected {PINS}")
    return python


# --------------------------------------------------------------------------- processes


class _Child:
    """One ``autogen_runtime.py`` role in a child process.

    Its stdout (protocol lines) is read on a thread into a queue, its stderr goes to
    a temporary file quoted in errors. Closing its stdin tells it to stop; if it does
    not, it is killed. It also stops by itself when this process dies (stdin EOF).
    """

    def __init__(self, python: Path, role: str, *args: str) -> None:
        self.role = role
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        self._lines: queue.Queue[str | None] = queue.Queue()
        try:
            # -I: no PYTHON* variables, user site or script directory on sys.path.
            self._proc = subprocess.Popen(
                [str(python), "-I", str(RUNTIME_SCRIPT), role, *args],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
            )
        except OSError as exc:
            self._stderr.close()
            raise BaselineUnavailable(f"could not start the AutoGen {role}: {exc}") from exc
        threading.Thread(target=self._read, name=f"autogen-{role}-stdout", daemon=True).start()

    def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        for line in stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return _tail(self._stderr.read())

    def fail(self, what: str) -> BaselineUnavailable:
        code = self._proc.poll()
        status = "still running" if code is None else f"exit status {code}"
        detail = self.stderr_tail()
        return BaselineUnavailable(f"AutoGen {self.role}: {what} ({status})" + (f":\n{detail}" if detail else ""))

    def expect(self, prefix: str, timeout: float, on_other: Callable[[str], None] | None = None) -> str:
        """The rest of the next line starting with ``prefix``; other lines go to ``on_other``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self.fail(f"no {prefix.strip()!r} line within {timeout:.0f} s") from None
            if line is None:
                self._proc.wait()
                raise self.fail(f"exited before {prefix.strip()!r}")
            if line.startswith(prefix):
                return line[len(prefix) :]
            if on_other is not None:
                on_other(line)

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


def _client_timeout(cfg: Config) -> float:
    """How long the client may go without a line: one phase is two capped runs."""
    return 2 * (cfg.max_seconds + 30.0) + START_TIMEOUT


# --------------------------------------------------------------------------- report


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(
    sequential: Sequence[dict[str, Any]], concurrent: Sequence[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Median, min and max over the runs. The concurrent key says 64 whatever
    ``Config.concurrency`` is, so the suite can rely on it; the table says the real one."""
    return {
        "sequential_rt_per_s": _stats([r["rt_per_s"] for r in sequential]),
        "sequential_p50_us": _stats([r["p50_us"] for r in sequential]),
        "sequential_p99_us": _stats([r["p99_us"] for r in sequential]),
        "concurrent64_msgs_per_s": _stats([r["msgs_per_s"] for r in concurrent]),
    }


def machine_facts() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def run_baseline(cfg: Config, progress: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Measure AutoGen's gRPC runtime; a JSON-able dict, or ``BaselineUnavailable``.

    Blocking (it waits on child processes): from async code, run it in a thread.
    """
    if cfg.runs < 1 or cfg.concurrency < 1 or cfg.payload < 0 or cfg.max_seconds <= 0:
        raise ValueError("runs and concurrency must be >= 1, payload >= 0, max_seconds > 0")
    machine = machine_facts()
    python = ensure_venv(Path(cfg.venv), progress)
    client_cfg = {
        "payload": cfg.payload,
        "runs": cfg.runs,
        "sequential_count": cfg.sequential_count,
        "concurrent_count": cfg.concurrent_count,
        "concurrency": cfg.concurrency,
        "max_seconds": cfg.max_seconds,
        "warmup_count": cfg.warmup_count,
    }
    with contextlib.ExitStack() as children:  # closed in reverse: client, worker, host
        progress("starting AutoGen host, worker and client processes")
        host = _Child(python, "host")
        children.callback(host.close)
        port, versions_json = host.expect("READY ", START_TIMEOUT).split(" ", 1)
        versions: dict[str, str] = json.loads(versions_json)
        address = f"127.0.0.1:{int(port)}"

        worker = _Child(python, "worker", address)
        children.callback(worker.close)
        worker.expect("READY", START_TIMEOUT)

        client = _Child(python, "client", address, json.dumps(client_cfg))
        children.callback(client.close)

        def forward(line: str) -> None:
            if line.startswith("PROGRESS "):
                progress(line[len("PROGRESS ") :])

        result: dict[str, Any] = json.loads(client.expect("RESULT ", _client_timeout(cfg), forward))
    machine["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "summary": summarize(result["sequential"], result["concurrent"]),
        "versions": versions,
        "machine": machine,
        "config": asdict(cfg),
        "sequential": result["sequential"],
        "concurrent": result["concurrent"],
    }


def format_table(doc: dict[str, Any]) -> str:
    v, m, c, summary = doc["versions"], doc["machine"], doc["config"], doc["summary"]
    rows = [
        ("sequential round trips/s", "sequential_rt_per_s", "{:,.0f}"),
        ("sequential p50 latency (µs)", "sequential_p50_us", "{:,.1f}"),
        ("sequential p99 latency (µs)", "sequential_p99_us", "{:,.1f}"),
        (f"{c['concurrency']} concurrent msgs/s", "concurrent64_msgs_per_s", "{:,.0f}"),
    ]
    header = (
        f"AutoGen gRPC runtime echo (host, worker, client processes): autogen-core {v['autogen-core']}, "
        f"autogen-ext {v['autogen-ext']}, grpcio {v['grpcio']}, Python {v['python']}, {m['nproc']} CPUs, "
        f"payload {c['payload']} B, {c['runs']} runs (median [min, max])"
    )
    width = max(len(r[0]) for r in rows)
    lines = [header, "-" * len(header)]
    for label, key, fmt in rows:
        s = summary[key]
        lines.append(
            f"{label:<{width}}  {fmt.format(s['median']):>10}  [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"
        )
    load0, load1 = m.get("loadavg_at_start"), m.get("loadavg_at_end")
    if load0 and load1:
        lines.append(f"load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m bench.autogen_baseline",
        description="AutoGen gRPC distributed-runtime echo baseline (host, worker and client processes on loopback).",
    )
    p.add_argument("--payload", type=int, default=d.payload, help="characters in the message's string")
    p.add_argument("--runs", type=int, default=d.runs, help="measured runs per mode (>=1)")
    p.add_argument("--count", type=int, default=d.sequential_count, help="round trips per sequential run")
    p.add_argument("--concurrent-count", type=int, default=d.concurrent_count, help="messages per concurrent run")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests outstanding in concurrent runs")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="time cap of each run")
    p.add_argument("--warmup", type=int, default=d.warmup_count, help="warm-up messages per mode")
    p.add_argument("--venv", default=d.venv, help="AutoGen virtualenv (made if missing)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--json", metavar="PATH", type=Path, help="also write results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config(
        payload=args.payload,
        runs=args.runs,
        sequential_count=args.count,
        concurrent_count=args.concurrent_count,
        concurrency=args.concurrency,
        max_seconds=args.max_seconds,
        warmup_count=args.warmup,
        venv=str(Path(args.venv).resolve()),
    )
    if args.quick:
        cfg.runs = min(cfg.runs, 3)
        cfg.sequential_count = min(cfg.sequential_count, 300)
        cfg.concurrent_count = min(cfg.concurrent_count, 600)
        cfg.warmup_count = min(cfg.warmup_count, 100)
        cfg.max_seconds = min(cfg.max_seconds, 0.3)
    if cfg.runs < 1 or cfg.concurrency < 1 or cfg.payload < 0 or cfg.max_seconds <= 0:
        raise SystemExit("--runs and --concurrency must be >= 1, --payload >= 0, --max-seconds > 0")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[autogen] {msg}", file=sys.stderr, flush=True)

    try:
        doc = run_baseline(cfg, progress)
    except BaselineUnavailable as exc:
        print(f"AutoGen baseline unavailable: {exc}", file=sys.stderr)
        return 2
    print(format_table(doc))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
