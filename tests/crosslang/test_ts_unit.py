"""The TypeScript SDK's own tests (clients/ts/test, node:test) in the cross-language run:
clients/ci.sh runs the Go and Rust unit tests itself, and clients/build.sh compiles these
into clients/ts/dist/test. They run fake sidecars on loopback (undecodable frames, deep
values, 16 MiB messages, the reconnect cap)."""

from __future__ import annotations

import subprocess

import pytest

from .harness import CLIENTS

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(180)]


def test_typescript_sdk_unit_tests() -> None:
    tests = CLIENTS / "ts/dist/test"
    assert any(tests.glob("*.test.js")), f"{tests} has no compiled tests: run clients/build.sh ts"
    done = subprocess.run(
        ["node", "--test", str(tests)],
        cwd=CLIENTS / "ts",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"node --test failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert "# fail 0" in done.stdout, done.stdout
