#!/usr/bin/env bash
# A splitter fed by the test source and N real `p2psp peer` processes (team size 1: plain fan-out),
# on loopback. Prints the splitter's status lines and its user/system CPU over the window.
#
#   perf/process-peers.sh [PEERS=50] [BITRATE=8M] [IO=io_uring|sendmmsg] [SECONDS=10]
#
# Heavier per peer than loadgen (one process each), but it runs exactly what users run.
set -euo pipefail
PEERS=${1:-50}; RATE=${2:-8M}; IO=${3:-io_uring}; SECS=${4:-10}
cd "$(dirname "$0")/.."
cargo build --release -q -p p2psp
BIN=target/release/p2psp
LOG=$(mktemp)
pids=()
cleanup() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -f "$LOG"; }
trap cleanup EXIT
$BIN splitter --port 0 --bind 127.0.0.1 --team-size 1 --bitrate "$RATE" --io "$IO" \
    --header-size 0 2>"$LOG" &
SPLITTER=$!; pids+=("$SPLITTER")
for _ in $(seq 50); do grep -q "listening on" "$LOG" && break; sleep 0.1; done
PORT=$(sed -n 's/^p2psp splitter listening on .*:\([0-9]*\)$/\1/p' "$LOG" | head -1)
[ -n "$PORT" ] || { echo "the splitter did not start:"; cat "$LOG"; exit 1; }
for _ in $(seq "$PEERS"); do
    $BIN peer --splitter "127.0.0.1:$PORT" --player-port 0 -q 2>/dev/null & pids+=($!)
done
sleep 3
HZ=$(getconf CLK_TCK)
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$SPLITTER/stat")
sleep "$SECS"
read -r u2 s2 < <(awk '{print $14, $15}' "/proc/$SPLITTER/stat")
grep '^splitter:' "$LOG" | tail -3
awk -v u=$((u2 - u1)) -v s=$((s2 - s1)) -v hz="$HZ" -v t="$SECS" -v p="$PEERS" -v r="$RATE" -v io="$IO" \
    'BEGIN { printf "peers %s at %s over %s: splitter CPU user %.3f + system %.3f cores (user %.1f %% of its CPU)\n", p, r, io, u/hz/t, s/hz/t, 100*u/(u+s+1e-9) }'
