"""The Go, TypeScript and Rust programs of the docs (blocks marked `<!-- snippet: ... -->`,
tests/docsnippets.py) compile as a user outside this repository would build them, so a doc
that drifts from the SDK fails clients/ci.sh:

* Go: a module of its own that requires `carsvc/clients/go` through a `replace` directive
  (as docs/workers/go.md says), `go vet` and `go build`; then each page's workers and
  clients run against a live sidecar and the clients must succeed;
* TypeScript: a project with `@carsvc/client` installed from clients/ts (the link
  `npm install <dir>` makes), compiled by tsc as CommonJS (the repository's compiler
  options) and as ES modules; the CommonJS build then runs like the Go one;
* Rust: a crate with a path dependency on clients/rust/carsvc, `cargo check`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from carsvc.client import Client
from tests.docsnippets import Snippet, programs

from .harness import CLIENTS, Process, Sidecar, with_client

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(600)]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, f"{' '.join(cmd)} (in {cwd}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _by_page(snippets: list[Snippet]) -> dict[Path, list[Snippet]]:
    pages: dict[Path, list[Snippet]] = defaultdict(list)
    for s in snippets:
        pages[s.path].append(s)
    return pages


def _run_pages(tmp: Path, sidecar: Sidecar, snippets: list[Snippet], command: dict[str, list[str]]) -> None:
    """Each page's workers (`command[name]`), then its clients, which must exit 0."""
    for on_page in _by_page(snippets).values():
        workers = [s for s in on_page if s.kind == "worker"]
        started = [Process(s.name, command[s.name], tmp / f"{s.name}.log") for s in workers]
        try:

            async def connected(client: Client, started: list[Process] = started) -> None:
                deadline = time.monotonic() + 30
                while len(await client.list_workers()) < len(started):
                    for proc in started:
                        assert proc.proc.poll() is None, f"{proc.name} exited:\n{proc.text()}"
                    assert time.monotonic() < deadline, "the workers of the page did not connect"
                    await asyncio.sleep(0.05)

            with_client(sidecar.address, connected)
            for client in (s for s in on_page if s.kind == "client"):
                done = subprocess.run(command[client.name], capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, f"{client.where}:\n{done.stdout}\n{done.stderr}"
                assert done.stdout.strip() == "combined 3 summaries", f"{client.where}: {done.stdout}"
        finally:
            for proc in started:
                proc.stop()


def test_go_programs_vet_build_and_run(tmp_path: Path) -> None:
    snippets = programs("go")
    assert snippets, "no Go program in the docs"
    sidecar = Sidecar(tmp_path)
    module = tmp_path / "docs-go"
    module.mkdir()
    # The SDK's requirements pinned as in its own go.mod (what `go mod tidy` would
    # add, without reaching for its dependencies' test-only modules).
    pinned = re.findall(r"^\t(\S+ v\S+)", (CLIENTS / "go" / "go.mod").read_text(), re.M)
    (module / "go.mod").write_text(
        "module docsnippets\n\ngo 1.26\n\nrequire (\n\tcarsvc/clients/go v0.0.0\n"
        + "".join(f"\t{line}\n" for line in pinned)
        + f")\n\nreplace carsvc/clients/go => {CLIENTS / 'go'}\n"
    )
    shutil.copy(CLIENTS / "go" / "go.sum", module / "go.sum")
    for s in snippets:
        (module / s.name).mkdir()
        (module / s.name / "main.go").write_text(s.at(sidecar.address))
    offline = {"GOFLAGS": "-mod=mod", "GOPROXY": "off"}
    _run(["go", "vet", "./..."], module, offline)
    _run(["go", "build", "-o", str(tmp_path / "bin") + "/", "./..."], module, offline)
    sidecar.start()
    try:
        _run_pages(tmp_path, sidecar, snippets, {s.name: [str(tmp_path / "bin" / s.name)] for s in snippets})
    finally:
        sidecar.stop()


def _ts_project(root: Path, *, esm: bool) -> Path:
    """A project of a user's own, with @carsvc/client linked in as `npm install <dir>` does."""
    modules = root / "node_modules"
    (modules / "@carsvc").mkdir(parents=True)
    (modules / "@carsvc" / "client").symlink_to(CLIENTS / "ts", target_is_directory=True)
    (modules / "@types").symlink_to(CLIENTS / "ts" / "node_modules" / "@types", target_is_directory=True)
    package = {"name": "docs-ts", "private": True, **({"type": "module"} if esm else {})}
    (root / "package.json").write_text(json.dumps(package))
    options = json.loads((CLIENTS / "ts" / "tsconfig.json").read_text())["compilerOptions"]
    options.update(outDir="dist", rootDir=".", declaration=False)
    (root / "tsconfig.json").write_text(json.dumps({"compilerOptions": options, "include": ["*.ts"]}))
    return root


def test_ts_programs_compile_as_commonjs_and_esm_and_run(tmp_path: Path) -> None:
    snippets = programs("ts")
    assert snippets, "no TypeScript program in the docs"
    assert (CLIENTS / "ts" / "dist" / "src" / "index.js").exists(), "build clients/ts first (clients/build.sh ts)"
    sidecar = Sidecar(tmp_path)
    tsc = str(CLIENTS / "ts" / "node_modules" / ".bin" / "tsc")
    for esm in (False, True):
        project = _ts_project(tmp_path / ("esm" if esm else "cjs"), esm=esm)
        for s in snippets:
            (project / f"{s.name}.ts").write_text(s.at(sidecar.address))
        _run([tsc, "-p", str(project)], project)
    sidecar.start()
    try:
        dist = tmp_path / "cjs" / "dist"
        _run_pages(tmp_path, sidecar, snippets, {s.name: ["node", str(dist / f"{s.name}.js")] for s in snippets})
    finally:
        sidecar.stop()


def test_rust_programs_check(tmp_path: Path) -> None:
    snippets = programs("rust")
    assert snippets, "no Rust program in the docs"
    crate = tmp_path / "docs-rust"
    (crate / "src" / "bin").mkdir(parents=True)
    (crate / "Cargo.toml").write_text(
        '[package]\nname = "doc-snippets"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n'
        "[dependencies]\n"
        f'carsvc = {{ path = "{CLIENTS / "rust" / "carsvc"}" }}\n'
        'tokio = { version = "1", default-features = false, features = ["rt-multi-thread", "macros", "signal"] }\n'
        'serde_json = "1"\n\n'
        # The workspace's profile, so the dependencies it built are reused.
        '[profile.dev]\ndebug = "line-tables-only"\n\n[profile.dev.package."*"]\ndebug = false\n\n[workspace]\n'
    )
    shutil.copy(CLIENTS / "rust" / "Cargo.lock", crate / "Cargo.lock")
    for s in snippets:
        (crate / "src" / "bin" / f"{s.name}.rs").write_text(s.code)
    _run(
        ["cargo", "check", "--offline", "--quiet", "--bins"], crate,
        {"CARGO_TARGET_DIR": str(CLIENTS / "rust" / "target")}, timeout=600,
    )
