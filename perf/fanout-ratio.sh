#!/usr/bin/env bash
# The splitter against the kernel's own limit, on this machine, in the same session.
#
# Alternates, PAIRS times: the bare sendmmsg fan-out loop (`loadgen --baseline sendmmsg`), the
# splitter with its io_uring send path, the splitter with its sendmmsg send path; all at
# saturation (team size 1, 1 KiB chunks, 1000 peers, a stream rate far above what one core can fan
# out), and prints each run and the medians of the ratios:
#   splitter/baseline  (io_uring splitter against the bare loop; target >= 0.95)
#   io_uring/sendmmsg  (the splitter's two send paths; target >= 1)
# Ratios are of datagrams/s the peers received (rx). Each run also shows the share of datagrams
# the kernel dropped at the peers' full receive buffers (per-socket counters in /proc/net/udp):
# over 1 % (marked *) means loadgen's receive thread, which shares this 2-core machine, fell
# behind; the sender then runs faster than it could with live receivers (a drop at a full socket
# is cheaper than a delivery), so such a run measures the receiver, not the sender. The medians
# are printed over all pairs and over the pairs without a marked run.
#
# Bounded: every run has a time limit; waiting for an idle machine gives up after IDLE_WAIT s.
# SIGN=1: both splitter runs sign (`loadgen --sign KEY --no-verify`: the default digest mode, one
# signed digest per group of up to 32 chunks, peers that join the signed teams without verifying,
# so that the splitter's cost is measured, not loadgen's). The peers then also receive one digest
# datagram per group (about 3 % more datagrams, counted in rx like the chunks).
# Environment: PAIRS (5), PEERS (1000), SECS (5, measured seconds per run), BITRATE (10M), SIGN (0),
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
SIGN=${SIGN:-0}
# shellcheck source=perf/common.sh
source "$(dirname "$0")/common.sh"



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
    local rx del
    rx=$(fanout "$json" rx_datagrams_per_s)
    del=$(fanout "$json" delivered_datagrams_per_s)
    awk -v rx="$rx" -v del="$del" 'BEGIN {d = (del > 0 ? (del - rx) / del * 100 : 0); printf "%.0f %.1f%s\n", rx, d, (d > 1 ? "*" : "")}'
}

# Ratio a/b of two rx figures, 3 decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", (b > 0 ? a / b : 0)}'; }

# Whether a drop column is marked.
marked() { [[ $1 == *'*' ]]
}

clean() { if [[ -f $1 ]]; then echo "$(median <"$1") over $(wc -l <"$1") clean"; else echo "- (no clean pair)"; fi; }

sign=()
if [[ $SIGN == 1 ]]; then sign=(--sign "$work/splitter.key" --no-verify); fi
printf '%-4s %5s | %-18s | %-18s | %-18s | %9s %9s %9s\n' pair idle "baseline rx drop%" \
    "spl. io_uring" "spl. sendmmsg" "spl/base" "uring/mm" "mm/base"
echo "(the idle column is the machine's idle share before the pair, waited for up to ${IDLE_WAIT} s)"
start=$SECONDS
for ((p = 1; p <= PAIRS; p++)); do
    idle=$(wait_idle)
    read -r brx bd < <(run "base$p" --baseline sendmmsg)
    read -r urx ud < <(run "uring$p" --io io_uring "${sign[@]}")
    read -r mrx md < <(run "mmsg$p" --io sendmmsg "${sign[@]}")
    r1=$(ratio "$urx" "$brx")
    r2=$(ratio "$urx" "$mrx")
    r3=$(ratio "$mrx" "$brx")
    echo "$r1" >>"$work/r1"
    echo "$r2" >>"$work/r2"
    echo "$r3" >>"$work/r3"
    if ! marked "$bd" && ! marked "$ud"; then echo "$r1" >>"$work/c1"; fi
    if ! marked "$ud" && ! marked "$md"; then echo "$r2" >>"$work/c2"; fi
    if ! marked "$md" && ! marked "$bd"; then echo "$r3" >>"$work/c3"; fi
    printf '%-4s %4s%% | %9s %7s%% | %9s %7s%% | %9s %7s%% | %9s %9s %9s\n' \
        "$p" "$idle" "$brx" "$bd" "$urx" "$ud" "$mrx" "$md" "$r1" "$r2" "$r3"
done
echo
echo "median over $PAIRS pairs (datagrams/s received by the peers; $PEERS peers, team size 1, 1 KiB chunks, $BITRATE offered, ${SECS} s each, $((SECONDS - start)) s in all$([[ $SIGN == 1 ]] && echo ", the splitter signing digests")):"
echo "  splitter(io_uring)/baseline(sendmmsg) = $(median <"$work/r1")   [$(clean "$work/c1")]   (target >= 0.95)"
echo "  splitter io_uring/sendmmsg            = $(median <"$work/r2")   [$(clean "$work/c2")]   (target >= 1)"
echo "  splitter(sendmmsg)/baseline(sendmmsg) = $(median <"$work/r3")   [$(clean "$work/c3")]"
