"""The docs' code cannot drift: every block of README.md and docs/ that is a
whole program is marked (tests/docsnippets.py) and run or compiled; here, the
Python ones run against a live sidecar -- each page's workers, then its clients
-- and every Python block, whole or not, parses. Go, TypeScript and Rust
programs are compiled by tests/crosslang/test_doc_programs.py (clients/ci.sh)."""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from carsvc import types
from carsvc.client import Client
from carsvc.server import Sidecar
from tests.docsnippets import KINDS, ROOT, Snippet, all_snippets, programs

SNIPPETS = all_snippets()
PYTHON = programs("python")
PAGES: dict[Path, list[Snippet]] = defaultdict(list)
for _s in PYTHON:
    if _s.kind in ("worker", "client"):
        PAGES[_s.path].append(_s)
STANDALONE = [s for s in PYTHON if s.kind == "program"]


def test_every_whole_program_is_marked() -> None:
    unmarked = [s.where for s in SNIPPETS if s.looks_whole() and s.kind is None]
    assert not unmarked, f"mark these with <!-- snippet: worker|client|program --> (tests/docsnippets.py): {unmarked}"
    unknown = [(s.where, s.kind) for s in SNIPPETS if s.kind is not None and s.kind not in KINDS]
    assert not unknown, f"unknown snippet kinds: {unknown}"
    unsupported = [s.where for s in SNIPPETS if s.kind is not None and s.language not in ("python", "go", "ts", "rust")]
    assert not unsupported, f"only Python, Go, TypeScript and Rust programs are checked: {unsupported}"
    # The pages this test and tests/crosslang/test_doc_programs.py promise to cover.
    marked = {(s.path.relative_to(ROOT).as_posix(), s.language, s.kind) for s in SNIPPETS if s.kind}
    for language in ("python", "go", "ts", "rust"):
        page = f"docs/workers/{language}.md"
        assert {(page, language, "worker"), (page, language, "client")} <= marked, page
    assert {("README.md", "python", "worker"), ("README.md", "python", "client")} <= marked


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.language == "python"], ids=lambda s: s.where)
def test_every_python_block_parses(snippet: Snippet) -> None:
    compile(snippet.code, snippet.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    assert "carsvc._" not in snippet.code, "docs use the public modules (carsvc.types, not carsvc._proto)"


@pytest.mark.parametrize("snippet", STANDALONE, ids=lambda s: s.where)
def test_standalone_programs_run(snippet: Snippet, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", snippet.code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{snippet.where}:\n{done.stderr}"


@pytest.mark.parametrize("page", sorted(PAGES), ids=lambda p: str(p.relative_to(ROOT)))
async def test_a_pages_workers_and_clients_run_together(
    page: Path, sidecar: Sidecar, client: Client, tmp_path: Path
) -> None:
    """The page's workers serve its clients, which run to their end: every run
    they started succeeded (so a client asking for an agent no worker on the
    page serves fails here, not for a reader after 30 s)."""
    snippets = PAGES[page]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSVC_")}
    started = []
    try:
        for i, worker in enumerate(s for s in snippets if s.kind == "worker"):
            log = (tmp_path / f"worker-{i}.log").open("w")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", worker.at(sidecar.address), cwd=tmp_path, env=env, stdout=log, stderr=log
            )
            started.append((worker, proc, log))
        async with asyncio.timeout(30):
            while len(await client.list_workers()) < len(started):
                for worker, proc, log in started:
                    assert proc.returncode is None, f"{worker.where} exited; its output is in {log.name}"
                await asyncio.sleep(0.05)
        for snippet in (s for s in snippets if s.kind == "client"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", snippet.at(sidecar.address), cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, f"{snippet.where}:\n{out.decode()}\n{err.decode()}"
        runs = await client.list_runs()
        assert runs, f"the clients of {page.name} started no run"
        failed = [(r.run_id, r.termination_detail) for r in runs if r.status != types.RUN_STATUS_SUCCEEDED]
        assert not failed, failed
    finally:
        for _, proc, log in started:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
            log.close()
