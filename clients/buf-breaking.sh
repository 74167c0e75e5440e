#!/usr/bin/env bash
# buf breaking: the contract in the work tree against the last committed contract.
#
# "Last committed contract" is
#   * HEAD's proto/, when the work tree changes proto/ or buf.yaml (a developer's edit), else
#   * the contract just before the newest commit that changed proto/ (what CI sees in a
#     fresh clone: that the latest contract change broke nothing).
# CARSVC_BUF_AGAINST=<git ref> compares against that ref instead (e.g. a release tag).
# When the baseline is not in this clone (a shallow or single-commit clone, or the commit
# that created proto/), the check says so and passes: there is nothing to compare with.
set -euo pipefail
CLIENTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$CLIENTS/.." && pwd)"
BUF="${BUF:-$CLIENTS/ts/node_modules/.bin/buf}"
cd "$ROOT"

skip() { echo "buf breaking: skipped: $*"; exit 0; }

git rev-parse --git-dir >/dev/null 2>&1 || skip "not a git checkout"
against="${CARSVC_BUF_AGAINST:-}"
if [ -z "$against" ]; then
  if ! git diff --quiet HEAD -- proto buf.yaml 2>/dev/null; then
    against=HEAD
  else
    last="$(git log -1 --format=%H -- proto 2>/dev/null || true)"
    [ -n "$last" ] || skip "no commit of proto/ in this clone"
    git rev-parse -q --verify "$last^{commit}" >/dev/null || skip "commit $last is not in this clone"
    if ! git rev-parse -q --verify "$last^" >/dev/null 2>&1 \
      || ! git cat-file -e "$last^" 2>/dev/null; then
      skip "the parent of $(git rev-parse --short "$last") is not in this clone (shallow or first commit)"
    fi
    against="$last^"
  fi
fi
git cat-file -e "$against:proto" 2>/dev/null || skip "$against has no proto/ (the contract is new there)"

base="$(mktemp -d)"
trap 'rm -rf "$base"' EXIT
git archive "$against" proto buf.yaml | tar -x -C "$base"
echo "buf breaking: proto/ against $(git rev-parse --short "$against") ($against)"
"$BUF" breaking --against "$base"
echo "buf breaking: no breaking change"
