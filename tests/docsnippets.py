"""The code blocks of README.md and docs/, for the tests that compile and run them.

A block that is a whole program carries a marker on the line before its fence:

    <!-- snippet: worker -->   a worker: runs until stopped (Python: run against a
                               live sidecar, the page's client with it; Go, TypeScript,
                               Rust: compiled)
    <!-- snippet: client -->   a client: runs to its end against the page's worker
    <!-- snippet: program -->  runs on its own (no sidecar)

Programs name the sidecar `127.0.0.1:50051`; a test that runs one puts its own
sidecar's address there. tests/test_docs_snippets.py checks that every block
that looks like a whole program is marked, parses every Python block, and runs
the Python programs; tests/crosslang/test_doc_programs.py compiles the Go,
TypeScript and Rust ones (clients/ci.sh).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_ADDRESS = "127.0.0.1:50051"
KINDS = ("worker", "client", "program")
LANGUAGES = {"python": "python", "py": "python", "go": "go", "ts": "ts", "typescript": "ts", "rust": "rust"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*snippet:\s*(?P<kind>\S+)\s*-->")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str  # python, go, ts, rust, or the info string's first word
    kind: str | None  # worker, client, program, or None for a fragment
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def name(self) -> str:
        """A file-name-safe id: docs_workers_go_md_34."""
        return re.sub(r"\W", "_", f"{self.path.relative_to(ROOT)}_{self.line}")

    def looks_whole(self) -> bool:
        """A program someone would copy and run as it stands."""
        if self.language == "python":
            return "asyncio.run(" in self.code or "__name__" in self.code
        if self.language == "go":
            return self.code.lstrip().startswith("package main")
        if self.language == "ts":
            imports = re.search(r"^import ", self.code, re.M)
            return bool(imports and re.search(r"new (Worker|Client)\(", self.code))
        if self.language == "rust":
            return "fn main" in self.code
        return False

    def at(self, address: str) -> str:
        """The code with the sidecar's address replaced."""
        return self.code.replace(DOC_ADDRESS, address)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippets(path: Path) -> list[Snippet]:
    text = path.read_text()
    found = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        indent = m.group("indent")
        code = "".join(row.removeprefix(indent) for row in m.group("body").splitlines(keepends=True))
        word = (m.group("info").split() or [""])[0].lower()
        found.append(Snippet(path, line, LANGUAGES.get(word, word), marker.group("kind") if marker else None, code))
    return found


def all_snippets() -> list[Snippet]:
    return [s for path in doc_files() for s in snippets(path)]


def programs(language: str) -> list[Snippet]:
    return [s for s in all_snippets() if s.language == language and s.kind is not None]
