#!/usr/bin/env bash
# Builds target/carsvc-java-example.jar and its dependencies in target/lib. Every version in
# pom.xml is pinned, so once a build has resolved them into ~/.m2 the build runs offline
# (mvn -o); the first build on a machine resolves them from Maven Central.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
mvn_() { mvn -B -q -Dstyle.color=never "$@"; }
echo "== java: $(java -version 2>&1 | head -1), $(mvn -v 2>/dev/null | head -1 | sed "s/\x1b\[[0-9;]*m//g")"
t0=$SECONDS
if mvn_ -o package >/dev/null 2>&1; then
  echo "   built offline ($((SECONDS - t0))s)"
else
  mvn_ package
  echo "   built, resolving from Maven Central ($((SECONDS - t0))s)"
fi
