#!/usr/bin/env bash
# Latency at 70 % of the kernel's fan-out limit, measured in the same session as that limit, for
# each peer count in PEERS_LIST: the splitter against the bare kernel loop, pair by pair.
#
# For each peer count:
# 1. Calibrates: CAL saturation runs of the bare sendmmsg fan-out loop (`loadgen --baseline
#    sendmmsg`, team size 1, 1 KiB chunks, far more offered than one core sends); the median
#    datagrams/s the peers received is the baseline's rate.
# 2. Offers LOAD_PCT (70) % of that rate, as a stream bitrate (rate / peers chunks per second),
#    for DURATION (60) s, in PAIRS interleaved pairs: the bare loop, then the splitter (io_uring).
# 3. Prints per run: loss, latency p50/p99/p99.9/max from the source's schedule (the headline;
#    the bare loop has no source, its stamps are its own schedule), the same from the source's
#    write, how late a 1 ms sleep woke meanwhile (the machine's own scheduling noise), and the
#    splitter's own send lag (feed reading a chunk to its last send: p99 of the median second,
#    and the worst second's).
# 4. The verdict (issue 14, restated as ratios because this 2-core VM misses the absolute
#    targets with the bare loop too): per pair, splitter p99 / baseline p99 and p99.9 / p99.9;
#    met when the median over the pairs is <= 1 for both, and, at 100 peers, the median of the
#    splitter's send-lag p99 is <= 1 ms. The absolute targets (p99 <= 1 ms, p99.9 <= 5 ms) are
#    shown for machines with at least 4 cores.
#
# Both kinds of run use the same --thread-slice (THREAD_SLICE, default 100us): the splitter's
# shards and feed, loadgen's source writer and the bare loop all get it, so the pair stays like
# for like. THREAD_SLICE=off runs with the kernel's default slice. Likewise RT_PRIORITY (default
# 10; off turns it off): the same threads in the real-time SCHED_FIFO class (--rt-priority; needs
# root), the peers' workers staying in the ordinary class.
#
# Bounded: every run has a time limit; waiting for an idle machine gives up after IDLE_WAIT s.
# Environment: PEERS_LIST ("100 1000"; PEERS=N is a one-item list), DURATION (60), PAIRS (3;
# RUNS is an older name), CAL (3), LOAD_PCT (70), IDLE_WAIT (30), THREAD_SLICE (100us), RT_PRIORITY (10),
# LOADGEN (path; default: built with cargo), NICE (-10 as root; 0 turns it off).
set -euo pipefail

PEERS_LIST=${PEERS_LIST:-${PEERS:-100 1000}}
DURATION=${DURATION:-60}
PAIRS=${PAIRS:-${RUNS:-3}}
THREAD_SLICE=${THREAD_SLICE:-100us}
RT_PRIORITY=${RT_PRIORITY:-10}
CAL=${CAL:-3}
LOAD_PCT=${LOAD_PCT:-70}
IDLE_WAIT=${IDLE_WAIT:-30}
NICE=${NICE:--10}
# shellcheck source=perf/common.sh
source "$(dirname "$0")/common.sh"

loadgen() { # name, seconds, bitrate, extra flags...
    local name=$1 secs=$2 bitrate=$3
    shift 3
    if ! timeout $((secs + 120)) "${prefix[@]}" "$LOADGEN" --peers "$peers" --team-size 1 \
        --thread-slice "$THREAD_SLICE" --rt-priority "$RT_PRIORITY" --chunk-size 1024 --bitrate "$bitrate" --duration "$secs" --join-rate 2000 \
        --no-progress --quiet --json "$work/$name.json" "$@" >"$work/$name.out" 2>&1; then
        echo "loadgen $name failed:" >&2
        tail -20 "$work/$name.out" >&2
        exit 1
    fi
}

row() { # label, json; prints the row and leaves p99, p999 and lag in the globals r99, r999, rlag
    local j=$2
    local lost p50 mx w99 w999 n99 n999 nmax rx lagw
    lost=$(awk '/^  "chunks": \{/ {f = 1} f && $1 == "\"lost\":" {gsub(/[^0-9]/, "", $2); print $2; exit}' "$j")
    p50=$(field "$j" latency_ms p50)
    r99=$(field "$j" latency_ms p99)
    r999=$(field "$j" latency_ms p99_9)
    mx=$(field "$j" latency_ms max)
    w99=$(field "$j" latency_from_write_ms p99)
    w999=$(field "$j" latency_from_write_ms p99_9)
    n99=$(field "$j" machine_noise_ms p99)
    n999=$(field "$j" machine_noise_ms p99_9)
    nmax=$(field "$j" machine_noise_ms max)
    rx=$(field "$j" fanout rx_datagrams_per_s)
    rlag=$(field "$j" splitter_send_lag_ms p99_median)
    lagw=$(field "$j" splitter_send_lag_ms p99_worst)
    printf '%-16s %8.0f %6s | %8.3f %8.3f %9.3f %9.3f | %8.3f %9.3f | %7.3f %8.3f | %7.3f %8.3f %8.3f\n' \
        "$1" "$rx" "$lost" "$p50" "$r99" "$r999" "$mx" "$w99" "$w999" "$rlag" "$lagw" "$n99" "$n999" "$nmax"
    [[ "$lost" == 0 ]] || echo "  ^ lost $lost chunks" >>"$work/verdicts"
}

verdict_all=met
for peers in $PEERS_LIST; do
    # Saturation: 1.5 M datagrams/s offered, about three times what one core sends here.
    cal_bitrate=$(awk -v n="$peers" 'BEGIN {printf "%.0f", 1500000 / n * 1024 * 8}')
    echo "== $peers peers =="
    echo "calibrating: $CAL saturation runs of the bare sendmmsg loop (team size 1, 1 KiB chunks, 1.5 M datagrams/s offered, 5 s each)"
    : >"$work/cal"
    for ((c = 1; c <= CAL; c++)); do
        wait_idle >/dev/null
        loadgen "cal$peers-$c" 5 "$cal_bitrate" --baseline sendmmsg
        rx=$(field "$work/cal$peers-$c.json" fanout rx_datagrams_per_s)
        printf '  run %d: %.0f datagrams/s received\n' "$c" "$rx"
        echo "$rx" >>"$work/cal"
    done
    limit=$(median <"$work/cal" | awk '{printf "%.0f", $1}')
    rate=$(awk -v l="$limit" -v p="$LOAD_PCT" 'BEGIN {printf "%.0f", l * p / 100}')
    # Chunks per second = rate / peers; bitrate = chunks/s x 1024 B x 8.
    bitrate=$(awk -v r="$rate" -v n="$peers" 'BEGIN {printf "%.0f", r / n * 1024 * 8}')
    echo "baseline limit (median) $limit datagrams/s; ${LOAD_PCT} % = $rate datagrams/s = a $bitrate bit/s stream to $peers peers; $PAIRS pairs of $DURATION s; --thread-slice $THREAD_SLICE --rt-priority $RT_PRIORITY"
    printf '%-16s %8s %6s | %8s %8s %9s %9s | %8s %9s | %7s %8s | %7s %8s %8s\n' run "rx dg/s" lost \
        "p50 ms" "p99" "p99.9" max "wr p99" "wr p99.9" "lag p99" "lag wrst" "noise99" "noise99.9" "noise max"
    : >"$work/r99"
    : >"$work/r999"
    : >"$work/lag"
    for ((r = 1; r <= PAIRS; r++)); do
        wait_idle >/dev/null
        loadgen "base$peers-$r" "$DURATION" "$bitrate" --baseline sendmmsg
        row "baseline #$r" "$work/base$peers-$r.json"
        b99=$r99 b999=$r999
        wait_idle >/dev/null
        loadgen "split$peers-$r" "$DURATION" "$bitrate" --io io_uring
        row "splitter #$r" "$work/split$peers-$r.json"
        awk -v s="$r99" -v b="$b99" 'BEGIN {printf "%.4f\n", (b > 0 ? s / b : 99)}' >>"$work/r99"
        awk -v s="$r999" -v b="$b999" 'BEGIN {printf "%.4f\n", (b > 0 ? s / b : 99)}' >>"$work/r999"
        echo "$rlag" >>"$work/lag"
    done
    m99=$(median <"$work/r99")
    m999=$(median <"$work/r999")
    mlag=$(median <"$work/lag")
    v=$(awk -v a="$m99" -v b="$m999" -v l="$mlag" -v n="$peers" 'BEGIN {
        v = ""; if (a > 1) v = v " p99"; if (b > 1) v = v " p99.9"; if (n == 100 && l > 1) v = v " send-lag";
        print (v == "" ? "met" : "missed:" v)}')
    [[ -s "$work/verdicts" ]] && v="$v (loss: $(tr '\n' ' ' <"$work/verdicts"))" && : >"$work/verdicts"
    [[ $v == met ]] || verdict_all=missed
    echo "  ratios splitter/baseline per pair: p99 $(tr '\n' ' ' <"$work/r99")| p99.9 $(tr '\n' ' ' <"$work/r999")"
    echo "  median p99 ratio $m99, median p99.9 ratio $m999 (target <= 1); splitter send lag p99 median $mlag ms$( ((peers == 100)) && echo ' (target <= 1 ms)')"
    echo "  verdict at $peers peers: $v"
    echo
done
echo "overall: $verdict_all"
echo "'wr' is latency from the source's write (the baseline has no source: its write is its send); 'lag' is the"
echo "splitter's own send lag (feed reading a chunk to its last send: p99 of the median second, and of the"
echo "worst); 'noise' is how late a 1 ms sleep woke. Absolute targets for machines with >= 4 cores: p99 <= 1 ms,"
echo "p99.9 <= 5 ms at 70 % load, no loss."
