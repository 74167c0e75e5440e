"""Every language's example worker given several sidecar addresses: the first refuses
connections, so it connects to the second and serves a run there; when that sidecar is
killed, it moves on to the third and serves a run there too.

Run with `pytest -m crosslang tests/crosslang` (clients/ci.sh builds the programs first).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from carsvc.client import Client, agent, single

from .harness import Process, Sidecar, free_port, program, with_client

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(120)]


def _combined(address: str, text: str) -> str:
    async def run(client: Client) -> str:
        finished = await client.run(single(agent("combiner"), f"- [a] {text}"))
        return str(finished.result.single.output.answer)

    return with_client(address, run)


@pytest.mark.parametrize("lang", ["go", "ts", "rust", "python"])
def test_a_worker_skips_a_dead_address_and_moves_on_when_its_sidecar_dies(tmp_path: Path, lang: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    a, b = Sidecar(tmp_path / "a"), Sidecar(tmp_path / "b")
    for sidecar in (a, b):
        sidecar.tmp.mkdir()
        sidecar.start()
    worker_id = f"{lang}-replicas"
    cmd = [*program(lang, "worker"), "--target", f"{dead},{a.address},{b.address}", "--worker-id", worker_id]
    worker = Process(worker_id, cmd, tmp_path / "worker.log")
    try:
        worker.wait_for(rf"^ready {worker_id} ", timeout=30)
        worker.wait_for(rf"connected.*{re.escape(a.address)}")
        assert dead in worker.text(), worker.text()  # it tried the first address, and said so
        assert _combined(a.address, "on a") == "combined 1: on a"

        a.stop(signal.SIGKILL)
        worker.wait_for(rf"^ready {worker_id} ", timeout=30, count=2)
        worker.wait_for(rf"connected.*{re.escape(b.address)}")
        assert _combined(b.address, "on b") == "combined 1: on b"
        assert "Traceback" not in worker.text()
    finally:
        worker.stop()
        b.stop(signal.SIGKILL)
