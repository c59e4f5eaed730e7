#!/usr/bin/env bash
# loadgen across three splitters on loopback (docs/scale-out.md): loadgen serves its timestamped
# source, three `p2psp splitter`s pull it, loadgen joins PEERS peers (peer i to splitter i mod 3)
# and reports peers, fan-out, loss and latency by splitter and in total.
#
#   perf/multi-splitter.sh [PEERS=150] [SECONDS=10] [loadgen flags...]
set -euo pipefail
PEERS=${1:-150}; SECS=${2:-10}
shift 2 || shift $#
cd "$(dirname "$0")/.."
cargo build --release -q -p p2psp -p loadgen
B=target/release
pids=()
cleanup() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
$B/loadgen --splitter 127.0.0.1:18101,127.0.0.1:18102,127.0.0.1:18103 \
    --source-listen 127.0.0.1:18100 --peers "$PEERS" --duration "$SECS" --no-progress --no-pin \
    --quiet "$@" &
lg=$!
sleep 1
for i in 1 2 3; do
    $B/p2psp splitter --bind 127.0.0.1 --port 1810$i --source http://127.0.0.1:18100/loadgen \
        --header-size 0 --shards 1 >/dev/null 2>&1 &
    pids+=($!)
done
wait $lg
