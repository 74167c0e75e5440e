#!/usr/bin/env bash
# Three carsvc replicas on one Redis, a worker that knows all three, a map-reduce
# run through one of them, and that replica SIGKILLed in the middle of a second
# run: another replica takes the run over and finishes it, and the client's
# watch moves on by itself. Then the worker's own replica is killed: the worker
# reconnects to the one left, which runs a third map-reduce.
#
#   examples/cluster/run.sh          (from anywhere; needs redis-server 7+ or valkey-server)
#
# PYTHON (default: the repository's .venv, else python3) runs carsvc and the
# example programs; REDIS_SERVER names the server binary. Everything lives in a
# temporary directory, removed at the end, and every process is stopped.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
REDIS_SERVER=${REDIS_SERVER:-$(command -v redis-server || command -v valkey-server || echo redis-server)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/carsvc-cluster.XXXXXX")
PIDS=()

# SIGTERM (a graceful stop), and SIGKILL if the process is still there 10 s later.
stop() {
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "run.sh: pid $pid did not stop within 10 s of SIGTERM; SIGKILLed it" >&2
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    # Newest first: the worker and the replicas stop before Redis (a replica flushes its last writes to it).
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until FILE has a line matching PATTERN (or fails after 20 s, showing FILE).
wait_for() {
    local file=$1 pattern=$2
    for _ in $(seq 400); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "run.sh: timed out waiting for '$pattern' in $file:" >&2
    cat "$file" >&2
    exit 1
}

# -- Redis: its own port and directory, AOF on (what a replica acknowledges is in the AOF within 1 s)
REDIS_PORT=$(free_port)
"$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save '' \
    --appendonly yes --appendfsync everysec --loglevel warning >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
BACKEND=redis://127.0.0.1:$REDIS_PORT/0
until "$PYTHON" -c "import redis, sys; redis.Redis(port=$REDIS_PORT).ping()" 2>/dev/null; do sleep 0.05; done
echo "redis: listening on 127.0.0.1:$REDIS_PORT"

# -- Three replicas of carsvc on it. Heartbeats every 300 ms instead of 5 s, so a dead
# replica's runs are taken over after 0.9 s (heartbeat_timeout) instead of 15 s.
export CARSVC_HEARTBEAT_INTERVAL_MS=300
ADDRESSES=()
REPLICA_PIDS=()
for n in 1 2 3; do
    port=$(free_port)
    CARSVC_REPLICA_ID=replica-$n "$PYTHON" -m carsvc serve --port "$port" --backend "$BACKEND" \
        >"$WORK/replica-$n.log" 2>&1 &
    PIDS+=($!)
    REPLICA_PIDS+=($!)
    ADDRESSES+=("127.0.0.1:$port")
done
for n in 1 2 3; do
    wait_for "$WORK/replica-$n.log" "listening on"
    echo "replica-$n: listening on ${ADDRESSES[n-1]} (pid ${REPLICA_PIDS[n-1]})"
done
R1=${ADDRESSES[0]} R2=${ADDRESSES[1]} R3=${ADDRESSES[2]}

# -- A worker given every address: it connects to the first, replica-1.
"$PYTHON" "$HERE/worker.py" "$R1,$R2,$R3" >"$WORK/worker.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/worker.log" "^worker: connected"
grep "^worker: connected" "$WORK/worker.log"
sleep 1  # within a heartbeat, replica-2 and -3 read in Redis that replica-1's worker serves these agents

echo
echo "== 1. A map-reduce through replica-2 (the worker is on replica-1)"
"$PYTHON" "$HERE/client.py" "$R2" --items 12

echo
echo "== 2. Another through replica-2, SIGKILLed after 20 agents have finished"
{   # (bash's own "Killed" notice about replica-2 goes to /dev/null; the client's errors do not)
    "$PYTHON" "$HERE/client.py" "$R2,$R3" --items 60 --kill "${REPLICA_PIDS[1]}" --after 20 2>&3
    wait "${REPLICA_PIDS[1]}" || true
} 3>&2 2>/dev/null
grep -ho "run [0-9a-f]*: taken over by replica [a-z0-9-]*" "$WORK"/replica-[13].log | sed 's/^/replicas: /'

echo
echo "== 3. replica-1, the worker's, is stopped too: the worker moves to replica-3"
kill "${REPLICA_PIDS[0]}"  # SIGTERM: it drains its worker, which moves on at once
wait_for "$WORK/worker.log" "^worker: connected to $R3"
echo "worker: connected to $R3"
# The client is given the dead replica-2 first: it skips an address that does not answer.
"$PYTHON" "$HERE/client.py" "$R2,$R3" --items 12

echo
echo "done: every run succeeded"
