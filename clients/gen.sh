#!/usr/bin/env bash
# Generates the Go, TypeScript and Rust code for proto/car/v1.
#
#   clients/gen.sh            rewrite clients/{go/gen,ts/src/gen,rust/carsvc/src/gen}
#   clients/gen.sh --check    regenerate into a temporary directory and fail (exit 1)
#                             if any checked-in generated file differs
#   clients/gen.sh go ts      only these languages (go, ts, rust); works with --check
#
# One protoc for all: clients/protoc, i.e. grpc_tools.protoc 29.0 from the project's
# venv (grpcio-tools is pinned in pyproject.toml). Plugins are pinned per language:
#   go    protoc-gen-go v1.36.12 and protoc-gen-go-grpc v1.6.2, `tool` lines in go.mod
#   ts    ts-proto 2.18.0 in package-lock.json (needs `npm ci` in clients/ts first)
#   rust  tonic-prost-build 0.14.9 in Cargo.lock (the carsvc-codegen crate)
# Generated files are never edited by hand: edit proto/, then run this.
set -euo pipefail

CLIENTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$CLIENTS/.." && pwd)"
PROTOC="$CLIENTS/protoc"
GO_MODULE="carsvc/clients/go"
GO_PACKAGE="$GO_MODULE/gen/carv1"

check=0
langs=()
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    go|ts|rust) langs+=("$arg") ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gen.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done
[ ${#langs[@]} -gt 0 ] || langs=(go ts rust)

cd "$ROOT/proto"
PROTOS=()
while IFS= read -r f; do PROTOS+=("$f"); done < <(find car -name '*.proto' | LC_ALL=C sort)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

gen_go() {  # $1: output dir (gets gen/carv1/*.go)
  local out="$1" bin="$WORK/bin" maps=() f
  mkdir -p "$bin" "$out"
  (cd "$CLIENTS/go" && go build -o "$bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go \
    && go build -o "$bin/protoc-gen-go-grpc" google.golang.org/grpc/cmd/protoc-gen-go-grpc)
  # The contract has no go_package option (adding one would be a contract change), so
  # every file is mapped onto the one Go package here.
  for f in "${PROTOS[@]}"; do maps+=("M$f=$GO_PACKAGE;carv1"); done
  local go_opts grpc_opts
  go_opts="module=$GO_MODULE,$(IFS=,; echo "${maps[*]}")"
  grpc_opts="$go_opts,require_unimplemented_servers=true"
  "$PROTOC" -I. \
    --plugin=protoc-gen-go="$bin/protoc-gen-go" --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
    --go_out="$out" --go_opt="$go_opts" --go-grpc_out="$out" --go-grpc_opt="$grpc_opts" \
    "${PROTOS[@]}"
}

gen_ts() {  # $1: output dir (gets car/v1/*.ts and google/protobuf/*.ts)
  local out="$1" plugin="$CLIENTS/ts/node_modules/.bin/protoc-gen-ts_proto"
  if [ ! -x "$plugin" ]; then
    echo "gen.sh: ts-proto is not installed: run (cd clients/ts && npm ci) first" >&2
    exit 2
  fi
  mkdir -p "$out"
  # grpc-js services; Value/Struct become plain JS values; int64 as number.
  "$PROTOC" -I. --plugin=protoc-gen-ts_proto="$plugin" --ts_proto_out="$out" \
    --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,useOptionals=none,forceLong=number \
    "${PROTOS[@]}"
}

gen_rust() {  # $1: output dir (gets car.v1.rs)
  local out="$1"
  mkdir -p "$out"
  (cd "$CLIENTS/rust" && PROTOC="$PROTOC" cargo run --quiet --locked -p carsvc-codegen -- "$out")
}

target_of() {
  case "$1" in
    go) echo "$CLIENTS/go/gen" ;;
    ts) echo "$CLIENTS/ts/src/gen" ;;
    rust) echo "$CLIENTS/rust/carsvc/src/gen" ;;
  esac
}

status=0
for lang in "${langs[@]}"; do
  fresh="$WORK/$lang"
  case "$lang" in
    go) gen_go "$WORK/go-root"; fresh="$WORK/go-root/gen" ;;
    ts) gen_ts "$fresh" ;;
    rust) gen_rust "$fresh" ;;
  esac
  target="$(target_of "$lang")"
  rel="${target#"$ROOT"/}"
  if [ "$check" = 1 ]; then
    if [ -d "$target" ] && diff -r "$fresh" "$target" >"$WORK/$lang.diff"; then
      echo "$rel is up to date"
    else
      [ -d "$target" ] || echo "$rel is missing" >&2
      head -40 "$WORK/$lang.diff" >&2 || true
      echo "$rel is stale: run clients/gen.sh $lang" >&2
      status=1
    fi
  else
    rm -rf "$target"
    mkdir -p "$(dirname "$target")"
    cp -R "$fresh" "$target"
    echo "generated $rel"
  fi
done
exit "$status"
