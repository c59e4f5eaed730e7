#!/usr/bin/env bash
# loadgen's CPU per received datagram, shared sockets against a socket per peer, interleaved
# (shared, per-peer, shared, ...) in one run so both see the same machine; prints each run and
# the medians. Settings: RUNS (5), PEERS (1000), TEAM_SIZE (1), BITRATE (1M), DURATION (8),
# LOADGEN (target/release/loadgen), EXTRA (more loadgen flags). Every run is bounded (timeout).
set -euo pipefail
RUNS=${RUNS:-5} PEERS=${PEERS:-1000} TEAM_SIZE=${TEAM_SIZE:-1} BITRATE=${BITRATE:-1M}
DURATION=${DURATION:-8} LOADGEN=${LOADGEN:-target/release/loadgen} EXTRA=${EXTRA:-}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq "$RUNS"); do
    for mode in shared per-peer; do
        # shellcheck disable=SC2086
        timeout $((DURATION + 60)) "$LOADGEN" --sockets "$mode" --peers "$PEERS" \
            --team-size "$TEAM_SIZE" --bitrate "$BITRATE" --duration "$DURATION" \
            --no-progress -q --json "$out/$mode-$i.json" $EXTRA > /dev/null
    done
done
python3 - "$out" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
med = {}
for mode in ("shared", "per-peer"):
    us, rx, loss = [], [], []
    for i in range(1, runs + 1):
        r = json.load(open(f"{out}/{mode}-{i}.json"))
        us.append(r["loadgen"]["cpu_us_per_datagram"])
        rx.append(r["fanout"]["rx_datagrams_per_s"])
        loss.append(r["loss_ratio"])
    med[mode] = statistics.median(us)
    print(f"{mode:9} µs/datagram {' '.join(f'{u:.2f}' for u in us)}  median {med[mode]:.2f}"
          f"  (rx/s median {statistics.median(rx):,.0f}, worst loss {max(loss):.4%})")
print(f"shared / per-peer: {med['shared'] / med['per-peer']:.2f}")
PY
