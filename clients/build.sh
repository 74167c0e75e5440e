#!/usr/bin/env bash
# Installs each language's dependencies (pinned by go.sum, package-lock.json and
# Cargo.lock) and builds the helpers and example programs:
#   go    clients/go/bin/{summarizer-worker,mapreduce-client,otel-worker}
#   ts    clients/ts/dist/{src,examples}/*.js
#   rust  clients/rust/target/debug/examples/{summarizer_worker,mapreduce_client},
#         clients/rust/target/debug/carsvc-otel-worker
# Nothing is generated here: the generated code is checked in (clients/gen.sh).
#   clients/build.sh            all three
#   clients/build.sh go ts      only these
set -euo pipefail
CLIENTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(go ts rust)

step() { printf '== %s\n' "$*"; }
timed() { local t0=$SECONDS; "$@" || return; printf '   (%ss)\n' "$((SECONDS - t0))"; }

for lang in "${langs[@]}"; do
  case "$lang" in
    go)
      step "go: $(go version)"
      (cd "$CLIENTS/go" && timed go build -trimpath -o bin/ ./cmd/...)
      # A module of its own (it needs the OpenTelemetry SDK; the SDK module needs only the API).
      (cd "$CLIENTS/go/examples/otel-worker" && timed go build -trimpath -o ../../bin/ .)
      ;;
    ts)
      step "ts: node $(node --version), npm $(npm --version 2>/dev/null)"
      (cd "$CLIENTS/ts" && timed npm ci --no-audit --no-fund --loglevel=error && timed npm run --silent build)
      ;;
    rust)
      step "rust: $(cargo --version)"
      (cd "$CLIENTS/rust" && timed cargo build --locked --examples && timed cargo build --locked -p carsvc-otel-worker)
      ;;
    *) echo "build.sh: unknown language '$lang' (go, ts, rust)" >&2; exit 2 ;;
  esac
done
