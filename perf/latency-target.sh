#!/usr/bin/env bash
# Latency at 70 % of the kernel's fan-out limit, measured in the same session as that limit.
#
# 1. Calibrates: CAL saturation runs of the bare sendmmsg fan-out loop (`loadgen --baseline
#    sendmmsg`, team size 1, 1 KiB chunks, PEERS peers, far more offered than one core sends);
#    the median datagrams/s the peers received is the baseline's rate.
# 2. Offers LOAD_PCT (70) % of that rate, as a stream bitrate (rate / PEERS chunks per second),
#    for DURATION (60) s, RUNS times each: the bare loop, then the splitter (io_uring).
# 3. Prints per run: loss, latency p50/p99/p99.9/max from the source's schedule (the headline;
#    the bare loop has no source, its stamps are its own schedule), the same from the source's
#    write (the splitter's and the kernel's share), and how late a 1 ms sleep woke meanwhile
#    (the machine's own scheduling noise), the splitter's own worst send lag (its status lines: from
#    its feed's reading a chunk to its last send of it); then the verdict against the targets: no loss,
#    p99 <= 1 ms, p99.9 <= 5 ms.
#
# The bare loop is the reference: where it misses the targets too, at the same rate on the same
# peers, the machine (sender, loopback and every receiver on the same cores) is the limit.
#
# Bounded: every run has a time limit; waiting for an idle machine gives up after IDLE_WAIT s.
# Environment: PEERS (1000), DURATION (60), RUNS (1), CAL (3), LOAD_PCT (70), IDLE_WAIT (30),
# LOADGEN (path; default: built with cargo), NICE (-10 as root; 0 turns it off).
set -euo pipefail

PEERS=${PEERS:-1000}
DURATION=${DURATION:-60}
RUNS=${RUNS:-1}
CAL=${CAL:-3}
LOAD_PCT=${LOAD_PCT:-70}
IDLE_WAIT=${IDLE_WAIT:-30}
NICE=${NICE:--10}
# shellcheck source=perf/common.sh
source "$(dirname "$0")/common.sh"



# A number in a top-level object of a loadgen JSON report (serde's pretty printing indents
# top-level keys by two spaces, nested ones by more): field FILE OBJECT KEY.
field() {
    awk -v obj="  \"$2\": {" -v key="\"$3\":" '
        index($0, obj) == 1 {f = 1; next}
        f && $1 == key {gsub(/[^0-9.eE+-]/, "", $2); v = ($2 == "" ? 0 : $2); exit}
        f && /^  [}]/ {exit}
        END {print (v == "" ? 0 : v)}' "$1"
}

loadgen() { # name, seconds, bitrate, extra flags...
    local name=$1 secs=$2 bitrate=$3
    shift 3
    if ! timeout $((secs + 120)) "${prefix[@]}" "$LOADGEN" --peers "$PEERS" --team-size 1 \
        --chunk-size 1024 --bitrate "$bitrate" --duration "$secs" --join-rate 2000 \
        --no-progress --quiet --json "$work/$name.json" "$@" >"$work/$name.out" 2>&1; then
        echo "loadgen $name failed:" >&2
        tail -20 "$work/$name.out" >&2
        exit 1
    fi
}


# Saturation: 1.5 M datagrams/s offered, about three times what one core sends here.
cal_bitrate=$(awk -v n="$PEERS" 'BEGIN {printf "%.0f", 1500000 / n * 1024 * 8}')
echo "calibrating: $CAL saturation runs of the bare sendmmsg loop ($PEERS peers, team size 1, 1 KiB chunks, 1.5 M datagrams/s offered, 5 s each)"
for ((c = 1; c <= CAL; c++)); do
    wait_idle >/dev/null
    loadgen "cal$c" 5 "$cal_bitrate" --baseline sendmmsg
    rx=$(field "$work/cal$c.json" fanout rx_datagrams_per_s)
    printf '  run %d: %.0f datagrams/s received\n' "$c" "$rx"
    echo "$rx" >>"$work/cal"
done
limit=$(median <"$work/cal" | awk '{printf "%.0f", $1}')
rate=$(awk -v l="$limit" -v p="$LOAD_PCT" 'BEGIN {printf "%.0f", l * p / 100}')
# Chunks per second = rate / PEERS; bitrate = chunks/s x 1024 B x 8.
bitrate=$(awk -v r="$rate" -v n="$PEERS" 'BEGIN {printf "%.0f", r / n * 1024 * 8}')
echo "baseline limit (median) $limit datagrams/s; ${LOAD_PCT} % = $rate datagrams/s = a $bitrate bit/s stream to $PEERS peers"
echo

row() { # label, json
    local j=$2
    local lost p50 p99 p999 mx w99 w999 n99 n999 nmax
    lost=$(awk '/^  "chunks": \{/ {f = 1} f && $1 == "\"lost\":" {gsub(/[^0-9]/, "", $2); print $2; exit}' "$j")
    p50=$(field "$j" latency_ms p50)
    p99=$(field "$j" latency_ms p99)
    p999=$(field "$j" latency_ms p99_9)
    mx=$(field "$j" latency_ms max)
    w99=$(field "$j" latency_from_write_ms p99)
    w999=$(field "$j" latency_from_write_ms p99_9)
    n99=$(field "$j" machine_noise_ms p99)
    n999=$(field "$j" machine_noise_ms p99_9)
    nmax=$(field "$j" machine_noise_ms max)
    rx=$(field "$j" fanout rx_datagrams_per_s)
    local lag
    lag=$(field "$j" splitter_send_lag_ms max)
    local verdict
    verdict=$(awk -v l="$lost" -v a="$p99" -v b="$p999" 'BEGIN {
        v = ""; if (l > 0) v = v " loss"; if (a > 1) v = v " p99"; if (b > 5) v = v " p99.9";
        print (v == "" ? "met" : "missed:" v)}')
    printf '%-22s %8.0f %6s | %8.3f %8.3f %9.3f %9.3f | %8.3f %9.3f | %8.3f | %7.3f %8.3f %8.3f | %s\n' \
        "$1" "$rx" "$lost" "$p50" "$p99" "$p999" "$mx" "$w99" "$w999" "$lag" "$n99" "$n999" "$nmax" "$verdict"
}

printf '%-22s %8s %6s | %8s %8s %9s %9s | %8s %9s | %8s | %7s %8s %8s | %s\n' run "rx dg/s" lost \
    "p50 ms" "p99" "p99.9" max "wr p99" "wr p99.9" "lag max" "noise99" "noise99.9" "noise max" verdict
for ((r = 1; r <= RUNS; r++)); do
    wait_idle >/dev/null
    loadgen "base$r" "$DURATION" "$bitrate" --baseline sendmmsg
    row "baseline sendmmsg #$r" "$work/base$r.json"
    wait_idle >/dev/null
    loadgen "split$r" "$DURATION" "$bitrate" --io io_uring
    row "splitter io_uring #$r" "$work/split$r.json"
done
echo
echo "targets: no loss, p99 <= 1 ms, p99.9 <= 5 ms (latency from the schedule); 'wr' is from the source's"
echo "write (the baseline has no source: its write is its send); 'lag max' is the splitter's own send lag"
echo "(feed reading a chunk to its last send; 0 for the baseline); 'noise' is how late a 1 ms sleep woke."
