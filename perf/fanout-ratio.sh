#!/usr/bin/env bash
# The splitter against the kernel's own limit, on this machine, in the same session.
#
# Alternates, PAIRS times: the bare sendmmsg fan-out loop (`loadgen --baseline sendmmsg`), the
# splitter with its io_uring send path, the splitter with its sendmmsg send path; all at
# saturation (team size 1, 1 KiB chunks, 1000 peers, a stream rate far above what one core can fan
# out), and prints each run and the medians of the ratios:
#   splitter/baseline  (io_uring splitter against the bare loop; target >= 0.95)
#   io_uring/sendmmsg  (the splitter's two send paths; target >= 1)
# Ratios are of datagrams/s the peers received (rx, counted by the peers themselves). The
# datagrams/s the sender reports (tx) are shown too, but the splitter publishes its counters only
# when its shard catches up with the ring, so at saturation its status line is bursty; and when
# rx is far below the baseline's tx, loadgen's receive thread is the limit, not the sender.
#
# Bounded: every run has a time limit; waiting for an idle machine gives up after IDLE_WAIT s.
# Environment: PAIRS (5), PEERS (1000), SECS (5, measured seconds per run), BITRATE (10M),
# LOADGEN (path; default: built with cargo into the workspace's target), IDLE_WAIT (30),
# NICE (-10: as root, runs loadgen and its splitter at this niceness, so that other work on a
# shared machine disturbs the measurement less; 0 turns it off).
set -euo pipefail

PAIRS=${PAIRS:-5}
PEERS=${PEERS:-1000}
SECS=${SECS:-5}
BITRATE=${BITRATE:-10M}
IDLE_WAIT=${IDLE_WAIT:-30}
NICE=${NICE:--10}
prefix=()
if [[ $(id -u) == 0 && $NICE != 0 ]]; then prefix=(nice -n "$NICE"); fi
here=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${LOADGEN:-}" ]]; then
    (cd "$here" && cargo build --release --workspace --quiet)
    target=${CARGO_TARGET_DIR:-$here/target}
    LOADGEN=$target/release/loadgen
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Idle share of both cores over one second, in percent.
idle_pct() {
    local a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep 1
    read -r -a b < <(grep '^cpu ' /proc/stat)
    local total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    echo $(((b[4] - a[4] + b[5] - a[5]) * 100 / (total > 0 ? total : 1)))
}

# Waits (at most IDLE_WAIT s) until the machine is at least 90 % idle; prints the idle share seen.
wait_idle() {
    local deadline=$((SECONDS + IDLE_WAIT)) idle
    idle=$(idle_pct)
    while ((idle < 90 && SECONDS < deadline)); do idle=$(idle_pct); done
    echo "$idle"
}

# The first value of a field in the "fanout" object of a loadgen JSON report.
fanout() {
    awk -v key="\"$2\":" '/"fanout"/ {f = 1} f && $1 == key {gsub(/[^0-9.]/, "", $2); print ($2 == "" ? 0 : $2); exit}' "$1"
}

run() { # name, extra loadgen flags...
    local name=$1
    shift
    local json=$work/$name.json
    if ! timeout 180 "${prefix[@]}" "$LOADGEN" --peers "$PEERS" --team-size 1 --chunk-size 1024 \
        --bitrate "$BITRATE" --duration "$SECS" --join-rate 2000 --no-progress --quiet \
        --json "$json" "$@" >"$work/$name.out" 2>&1; then
        echo "loadgen $name failed:" >&2
        tail -20 "$work/$name.out" >&2
        exit 1
    fi
    echo "$(fanout "$json" rx_datagrams_per_s) $(fanout "$json" tx_datagrams_per_s)"
}

median() { sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

printf '%-4s %5s | %-21s | %-21s | %-21s | %9s %9s %9s\n' pair idle "baseline rx / tx" \
    "splitter io_uring" "splitter sendmmsg" "spl/base" "uring/mm" "mm/base"
echo "(the idle column is the machine's idle share before the pair, waited for up to ${IDLE_WAIT} s)"
start=$SECONDS
for ((p = 1; p <= PAIRS; p++)); do
    idle=$(wait_idle)
    read -r brx btx < <(run "base$p" --baseline sendmmsg)
    read -r urx utx < <(run "uring$p" --io io_uring)
    read -r mrx mtx < <(run "mmsg$p" --io sendmmsg)
    r1=$(awk -v a="$urx" -v b="$brx" 'BEGIN {printf "%.3f", (b > 0 ? a / b : 0)}')
    r2=$(awk -v a="$urx" -v b="$mrx" 'BEGIN {printf "%.3f", (b > 0 ? a / b : 0)}')
    r3=$(awk -v a="$mrx" -v b="$brx" 'BEGIN {printf "%.3f", (b > 0 ? a / b : 0)}')
    echo "$r1" >>"$work/r1"
    echo "$r2" >>"$work/r2"
    echo "$r3" >>"$work/r3"
    printf '%-4s %4s%% | %9.0f / %9.0f | %9.0f / %9.0f | %9.0f / %9.0f | %9s %9s %9s\n' \
        "$p" "$idle" "$brx" "$btx" "$urx" "$utx" "$mrx" "$mtx" "$r1" "$r2" "$r3"
done
echo
echo "median over $PAIRS pairs (datagrams/s received by the peers; $PEERS peers, team size 1, 1 KiB chunks, $BITRATE offered, ${SECS} s each, $((SECONDS - start)) s in all):"
echo "  splitter(io_uring)/baseline(sendmmsg) = $(median <"$work/r1")   (target >= 0.95)"
echo "  splitter io_uring/sendmmsg            = $(median <"$work/r2")   (target >= 1)"
echo "  splitter(sendmmsg)/baseline(sendmmsg) = $(median <"$work/r3")"
