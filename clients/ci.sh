#!/usr/bin/env bash
# CI for the Go, TypeScript and Rust clients (called from .ci/run after the Python
# suite, which has made .venv): build, lint and breaking-check the contract, check the
# generated code for drift, vet, the SDKs' unit tests (go test, cargo test, npm test),
# then the Java example's build and the cross-language tests against a live sidecar
# (among them tests/crosslang/test_doc_programs.py: the docs' Go, TypeScript and Rust programs).
set -euo pipefail
CLIENTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$CLIENTS/.." && pwd)"
cd "$ROOT"
PY="${CARSVC_PYTHON:-$ROOT/.venv/bin/python}"
BUF="$CLIENTS/ts/node_modules/.bin/buf"
[ -x "$PY" ] || { echo "clients/ci.sh: $PY is missing: make the venv first (pip install -e '.[test]')" >&2; exit 2; }
export CARSVC_PYTHON="$PY"
start=$SECONDS
section() { printf '\n== %s (at %ss)\n' "$*" "$((SECONDS - start))"; }

section "build (clients/build.sh)"
bash "$CLIENTS/build.sh"

section "buf lint"
"$BUF" --version
"$BUF" lint
echo "buf lint: clean"

section "buf breaking"
bash "$CLIENTS/buf-breaking.sh"

section "generated code is up to date (clients/gen.sh --check)"
bash "$CLIENTS/gen.sh" --check

section "formatting and vet"
unformatted="$(cd "$CLIENTS/go" && gofmt -l carsvc cmd examples)"
[ -z "$unformatted" ] || { echo "gofmt: not formatted: $unformatted" >&2; exit 1; }
(cd "$CLIENTS/go" && go vet ./...)
(cd "$CLIENTS/go/examples/otel-worker" && go vet ./...)
(cd "$CLIENTS/rust" && cargo fmt --check)
echo "gofmt, go vet, cargo fmt: clean"

section "Go unit tests"
(cd "$CLIENTS/go" && go test -count=1 ./...)

section "Rust unit tests and doc examples"
(cd "$CLIENTS/rust" && cargo test --locked -q -p carsvc --features otel)

section "TypeScript unit tests (npm test)"
(cd "$CLIENTS/ts" && npm test)

section "Java example (clients/java-example: Maven, stubs generated from proto/)"
bash "$CLIENTS/java-example/build.sh"

section "cross-language tests (and the docs' programs)"
"$PY" -m pytest -p no:cacheprovider -m crosslang -q tests/crosslang
