#!/usr/bin/env bash
# The measurements behind the capacity plan in docs/scale-out.md: peers per splitter core at
# 128 kbit/s, 1 Mbit/s and 4 Mbit/s with teams of 16, and the splitter's memory per peer.
#
# 1. The splitter's ceiling: CAL saturation runs of the splitter (io_uring, team size 1, 1000
#    peers, far more offered than one core sends); the median datagrams/s its peers received is
#    what one splitter core sends here (loopback: the core also pays the receivers' delivery, so
#    this is a floor for a real NIC).
# 2. For each BITRATES item, RUNS runs of loadgen against the splitter with teams of 16 and as
#    many peers as loadgen itself can carry on this machine (its peers relay: PEER_BUDGET received
#    datagrams/s in all) and with a quarter of them, DURATION s each: the splitter's CPU (user +
#    system, from /proc; the slope between the two loads is the cost of one more datagram,
#    without the fixed costs), its datagrams/s per peer, its RSS per peer, and the loss.
# 3. Prints, per bitrate, the medians and the plan's figures:
#      peers per core (CPU)     = 1 / (splitter CPU per datagram x datagrams per peer per second)
#      peers per core (ceiling) = ceiling datagrams/s / datagrams per peer per second
#      peers per 10 GbE         = 9.5 Gbit/s / (bitrate x (1 + per-datagram overhead) / team size)
#
# Bounded: every run has a time limit; waiting for an idle machine gives up after IDLE_WAIT s.
# Environment: BITRATES ("128k 1M 4M"), RUNS (3), DURATION (15), CAL (3), PEER_BUDGET (100000),
# MAX_PEERS (8000), TEAM (16), LOADGEN (path; default: built with cargo), IDLE_WAIT (30),
# NICE (-10 as root; 0 turns it off).
set -euo pipefail

BITRATES=${BITRATES:-128k 1M 4M}
RUNS=${RUNS:-3}
DURATION=${DURATION:-15}
CAL=${CAL:-3}
PEER_BUDGET=${PEER_BUDGET:-100000}
MAX_PEERS=${MAX_PEERS:-8000}
TEAM=${TEAM:-16}
IDLE_WAIT=${IDLE_WAIT:-30}
NICE=${NICE:--10}
# shellcheck source=perf/common.sh
source "$(dirname "$0")/common.sh"

loadgen() { # name, seconds, extra flags...
    local name=$1 secs=$2
    shift 2
    if ! timeout $((secs + 180)) "${prefix[@]}" "$LOADGEN" --chunk-size 1024 --duration "$secs" \
        --no-progress --quiet --json "$work/$name.json" "$@" >"$work/$name.out" 2>&1; then
        echo "loadgen $name failed:" >&2
        tail -20 "$work/$name.out" >&2
        exit 1
    fi
}

# Bits per second of a loadgen bitrate (k, M, G suffixes).
bits() { awk -v b="$1" 'BEGIN {m = 1; if (b ~ /k$/) m = 1e3; if (b ~ /M$/) m = 1e6; if (b ~ /G$/) m = 1e9; sub(/[kMG]$/, "", b); printf "%.0f", b * m}'; }

echo "splitter ceiling: $CAL saturation runs (io_uring, team size 1, 1000 peers, 5 s each)"
: >"$work/cal"
for ((c = 1; c <= CAL; c++)); do
    wait_idle >/dev/null
    loadgen "cal$c" 5 --peers 1000 --team-size 1 --bitrate 12M --io io_uring --join-rate 2000
    rx=$(field "$work/cal$c.json" fanout rx_datagrams_per_s)
    printf '  run %d: %.0f datagrams/s\n' "$c" "$rx"
    echo "$rx" >>"$work/cal"
done
ceiling=$(median <"$work/cal")
printf 'ceiling (median): %.0f datagrams/s per splitter core\n\n' "$ceiling"

printf '%-8s %6s %4s | %10s %7s %8s %9s %7s\n' bitrate peers run "spl dg/s" "cores" "dg/peer" "KiB/peer" lost
: >"$work/plan"
for b in $BITRATES; do
    bps=$(bits "$b")
    cps=$(awk -v b="$bps" 'BEGIN {print b / 8 / 1024}')
    peers=$(awk -v budget="$PEER_BUDGET" -v c="$cps" -v t="$TEAM" -v m="$MAX_PEERS" 'BEGIN {
        p = int(budget / c / t) * t; if (p > m) p = m; if (p < 4 * t) p = 4 * t; print p}')
    # Two loads, a quarter and the whole: the slope of CPU over datagrams/s is the cost of one
    # more datagram, without the splitter's fixed costs (timers, status, control plane).
    small=$(awk -v p="$peers" -v t="$TEAM" 'BEGIN {q = int(p / 4 / t) * t; print (q < t ? t : q)}')
    for n in "$small" "$peers"; do
        : >"$work/tx$n"
        : >"$work/cores$n"
        : >"$work/kib$n"
        for ((r = 1; r <= RUNS; r++)); do
            wait_idle >/dev/null
            name="cap-$b-$n-$r"
            loadgen "$name" "$DURATION" --peers "$n" --team-size "$TEAM" --bitrate "$b" \
                --buffer-size 64 --join-rate 5000 --io io_uring
            j=$work/$name.json
            tx=$(field "$j" fanout tx_datagrams_per_s)
            cores=$(field "$j" sender_cpu cores)
            kib=$(field "$j" splitter_memory rss_per_peer_kib)
            lost=$(awk '/^  "chunks": \{/ {f = 1} f && $1 == "\"lost\":" {gsub(/[^0-9]/, "", $2); print $2; exit}' "$j")
            echo "$tx" >>"$work/tx$n"
            echo "$cores" >>"$work/cores$n"
            echo "$kib" >>"$work/kib$n"
            printf '%-8s %6d %4d | %10.0f %7.4f %8.3f %9.2f %7s\n' "$b" "$n" "$r" "$tx" "$cores" \
                "$(awk -v t="$tx" -v p="$n" 'BEGIN {print t / p}')" "$kib" "$lost"
        done
    done
    echo "$b $bps $peers $(median <"$work/tx$small") $(median <"$work/cores$small") $(median <"$work/tx$peers") $(median <"$work/cores$peers") $(median <"$work/kib$peers")" >>"$work/plan"
done
echo
printf '%-8s | %9s %9s %9s | %12s %12s %12s\n' bitrate "µs/dg" "dg/peer" "KiB/peer" "peers/core" "(ceiling)" "per 10GbE"
while read -r b bps peers tx1 c1 tx2 c2 kib; do
    # 28 bytes of IPv4 + UDP headers and 2 of chunk number per 1024-byte chunk on the wire.
    awk -v b="$b" -v bps="$bps" -v p="$peers" -v tx1="$tx1" -v c1="$c1" -v tx2="$tx2" -v c2="$c2" \
        -v kib="$kib" -v ceil="$ceiling" -v t="$TEAM" 'BEGIN {
        us = (tx2 > tx1 ? (c2 - c1) * 1e6 / (tx2 - tx1) : 0)
        if (us <= 0) us = c2 * 1e6 / tx2
        dpp = tx2 / p
        core = 1e6 / (us * dpp)
        cap = ceil / dpp
        nic = 9.5e9 / (bps * (1024 + 30) / 1024 / t)
        printf "%-8s | %9.3f %9.3f %9.2f | %12.0f %12.0f %12.0f\n", b, us, dpp, kib, core, cap, nic}'
done <"$work/plan"
echo
echo "µs/dg: splitter CPU (user + system) per more datagram sent (the slope between the two loads); dg/peer: splitter datagrams/s per peer"
echo "(a chunk per team per chunk period); peers/core from that CPU cost, and from the ceiling measured"
echo "above; per 10GbE: peers whose splitter upload fits 9.5 Gbit/s. On loopback the sending core also"
echo "pays the receivers' delivery, so both per-core figures are floors for a host with a real NIC."
