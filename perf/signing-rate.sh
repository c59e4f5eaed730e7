#!/usr/bin/env bash
# CIS: does the splitter's signing keep up at a given chunk rate, and what share of a core does
# it take? (docs/integrity.md)
#
# Runs the splitter alone (the test source, no peers: signing is measured without the fan-out
# around it) at RATE chunks/s of 1 KiB for SECS seconds, RUNS times for each MODE, and prints per
# run: chunks cut from the source, chunks published signed (digest mode: every one must be, give
# or take the group open at either end), the mean chunks per signed group, the
# CPU share of the thread that signs (the `signer` thread in digest mode, the `feed` thread, which
# signs every chunk itself, in chunk mode; the unsigned feed thread for reference), read from
# /proc/PID/task/*/stat; then the medians. Bounded: every run has a time limit.
# Environment: RATE (16000), SECS (10), RUNS (3), MODES ("none digest chunk"), BIN (the p2psp
# binary; default: built with cargo into the workspace's target).
set -euo pipefail

RATE=${RATE:-16000}
SECS=${SECS:-10}
RUNS=${RUNS:-3}
MODES=${MODES:-none digest chunk}
here=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${BIN:-}" ]]; then
    (cd "$here" && cargo build --release --quiet --bin p2psp)
    BIN=${CARGO_TARGET_DIR:-$here/target}/release/p2psp
fi
work=$(mktemp -d)
pid=
cleanup() {
    if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# utime + stime ticks of the thread of process $1 named $2.
thread_ticks() {
    local t
    for t in /proc/"$1"/task/*; do
        if [[ $(cat "$t/comm" 2>/dev/null) == "$2" ]]; then
            awk '{sub(/.*\) /, ""); print $12 + $13}' "$t/stat"
            return
        fi
    done
    echo 0
}

metric() { awk -v m="$2" '$1 == m {print $2}' "$1"; }

hz=$(getconf CLK_TCK)
bits=$((RATE * 1024 * 8))
port=$((20000 + RANDOM % 20000))
mport=$((port + 1))
printf '%-7s %3s | %10s %10s %8s %7s | %-7s %8s\n' mode run "chunks in" signed "in-signed" "group" thread "CPU %"
for mode in $MODES; do
    for ((r = 1; r <= RUNS; r++)); do
        args=(splitter --source test --bitrate "$bits" --chunk-size 1024 --header-size 0
            --port "$port" --metrics "127.0.0.1:$mport")
        thread=feed
        case $mode in
        digest) args+=(--sign "$work/key" --sign-mode digest) thread=signer ;;
        chunk) args+=(--sign "$work/key" --sign-mode chunk) ;;
        esac
        "$BIN" "${args[@]}" 2>"$work/err" &
        pid=$!
        for _ in $(seq 50); do
            curl -sf "http://127.0.0.1:$mport/metrics" >"$work/m0" 2>/dev/null && break
            sleep 0.1
        done
        sleep 1
        t0=$(thread_ticks "$pid" "$thread")
        curl -sf "http://127.0.0.1:$mport/metrics" >"$work/m0"
        sleep "$SECS"
        t1=$(thread_ticks "$pid" "$thread")
        curl -sf "http://127.0.0.1:$mport/metrics" >"$work/m1"
        timeout 10 kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=
        in=$(($(metric "$work/m1" p2psp_splitter_chunks_in_total) - $(metric "$work/m0" p2psp_splitter_chunks_in_total)))
        signed=$(($(metric "$work/m1" p2psp_splitter_signed_chunks_total) - $(metric "$work/m0" p2psp_splitter_signed_chunks_total)))
        # Chunks cut but not signed within the run (still waiting in a group, at most one group).
        groups=$(($(metric "$work/m1" p2psp_splitter_signed_groups_total) - $(metric "$work/m0" p2psp_splitter_signed_groups_total)))
        lost=0 group=-
        if [[ $mode == digest ]]; then
            lost=$((in - signed))
            group=$(awk -v c="$signed" -v g="$groups" 'BEGIN {printf "%.1f", (g > 0 ? c / g : 0)}')
        fi
        cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$SECS" 'BEGIN {printf "%.1f", (b - a) / hz / s * 100}')
        echo "$cpu" >>"$work/cpu-$mode"
        printf '%-7s %3s | %10s %10s %8s %7s | %-7s %8s\n' "$mode" "$r" "$in" "$signed" "$lost" "$group" "$thread" "$cpu"
    done
done
echo
echo "median CPU share of the signing thread at $RATE chunks/s (1 KiB), ${SECS} s per run:"
for mode in $MODES; do
    echo "  $mode: $(sort -g "$work/cpu-$mode" | awk '{v[NR] = $1} END {print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}') %   (expected chunks: $((RATE * SECS)))"
done
