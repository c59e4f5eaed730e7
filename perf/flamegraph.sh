#!/usr/bin/env bash
# Profiles a splitter under load on loopback and draws a flame graph: see perf/README.md.
#
#   perf/flamegraph.sh                   # 50 peers, 10 Mbit/s, team size 1, 5 s of recording
#   PEERS=20 BITRATE=30M perf/flamegraph.sh
#   LOAD_CMD='"$BIN_DIR/loadgen" --splitter "$SPLITTER" --peers "$PEERS"' perf/flamegraph.sh
#
# Settings (environment variables):
#   PEERS      load size passed to the load command (default 50)
#   BITRATE    test source rate, `--bitrate` (default 10M: 1221 chunks/s, so 61k datagrams/s to
#              50 peers, which this 2-core VM sustains with 50 peer processes; at 20M it does not)
#   PORT       splitter TCP/UDP port on 127.0.0.1 (default: the first free one from 28001)
#   TEAM_SIZE  `--team-size` (default 1: every peer is its own team, so every chunk goes to every
#              peer straight from the splitter)
#   WARMUP     seconds between starting the load and starting to record (default 3)
#   DURATION   seconds of recording (default 5; dwarf stacks take ~30 MB per busy core-second)
#   SPLITTER_ARGS  extra splitter flags, e.g. '--io sendmmsg --shards 1'
#   LOAD_CMD   shell command that puts load on the splitter; it runs under `bash -c` with
#              SPLITTER (host:port), PEERS, P2PSP (the p2psp binary) and BIN_DIR exported, in its
#              own process group, which is killed at the end. Default: PEERS `p2psp peer`
#              processes.
#   OUT        output directory (default perf/out, gitignored)
#
# Everything is bounded in time, binds to 127.0.0.1 only, and kills what it started on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=${PEERS:-50}
BITRATE=${BITRATE:-10M}
PORT=${PORT:-}
TEAM_SIZE=${TEAM_SIZE:-1}
WARMUP=${WARMUP:-3}
DURATION=${DURATION:-5}
SPLITTER_ARGS=${SPLITTER_ARGS:-}
OUT=${OUT:-perf/out}
# shellcheck disable=SC2016 # expanded later, by the `bash -c` that runs it
DEFAULT_LOAD='for i in $(seq "$PEERS"); do "$P2PSP" peer --splitter "$SPLITTER" --player-port 0 -q & done; wait'
LOAD_CMD=${LOAD_CMD:-$DEFAULT_LOAD}

die() { echo "flamegraph.sh: $*" >&2; exit 1; }

# --- tools -----------------------------------------------------------------------------------
missing=0
if ! command -v perf >/dev/null || ! perf --version >/dev/null 2>&1; then
    echo "flamegraph.sh: perf is missing: apt-get install linux-perf" >&2
    missing=1
fi
for tool in inferno-collapse-perf inferno-flamegraph; do
    if ! command -v "$tool" >/dev/null; then
        echo "flamegraph.sh: $tool is missing: cargo install inferno" >&2
        missing=1
    fi
done
((missing == 0)) || exit 1
command -v setsid >/dev/null || die "setsid (util-linux) is missing"

# --- build -----------------------------------------------------------------------------------
echo "== building (cargo profile 'profiling': release + full debug info)"
cargo build --profile profiling --workspace --bins
BIN_DIR="$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/profiling"
P2PSP="$BIN_DIR/p2psp"
[[ -x $P2PSP ]] || die "no binary at $P2PSP"

mkdir -p "$OUT"
DATA="$OUT/perf.data"
rm -f "$DATA" "$DATA.old"

# --- children and cleanup --------------------------------------------------------------------
SPLITTER_PID=""
LOAD_PID=""
PERF_PID=""

# Sends `sig` to process group `pgid` and waits up to `secs` for it to be gone.
stop_group() {
    local pgid=$1 sig=$2 secs=$3
    kill "-$sig" -- "-$pgid" 2>/dev/null || return 0
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n $PERF_PID ]] && kill -INT "$PERF_PID" 2>/dev/null
    if [[ -n $LOAD_PID ]]; then
        stop_group "$LOAD_PID" INT 3 || stop_group "$LOAD_PID" KILL 2 || true
    fi
    if [[ -n $SPLITTER_PID ]]; then
        stop_group "$SPLITTER_PID" INT 5 || stop_group "$SPLITTER_PID" KILL 2 || true
    fi
    [[ -n $PERF_PID ]] && wait "$PERF_PID" 2>/dev/null
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- splitter and load -----------------------------------------------------------------------
listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
if [[ -z $PORT ]]; then
    for PORT in $(seq 28001 28100); do
        listening "$PORT" || break
    done
fi
if listening "$PORT"; then
    die "port $PORT is in use (set PORT)"
fi
SPLITTER="127.0.0.1:$PORT"
export SPLITTER PEERS P2PSP BIN_DIR
echo "== splitter on $SPLITTER: --bitrate $BITRATE --team-size $TEAM_SIZE $SPLITTER_ARGS"
# setsid: own process group (and session), so that cleanup reaches everything it starts.
# shellcheck disable=SC2086 # SPLITTER_ARGS is a list of flags
setsid "$P2PSP" splitter --source test --bitrate "$BITRATE" --bind 127.0.0.1 --port "$PORT" \
    --team-size "$TEAM_SIZE" $SPLITTER_ARGS >"$OUT/splitter.log" 2>&1 &
SPLITTER_PID=$!
for ((i = 0; i < 50; i++)); do
    listening "$PORT" && break
    kill -0 "$SPLITTER_PID" 2>/dev/null || die "the splitter exited: $(tail -3 "$OUT/splitter.log")"
    sleep 0.1
done
listening "$PORT" || die "the splitter does not listen on $PORT after 5 s"

echo "== load: $LOAD_CMD  (PEERS=$PEERS)"
setsid bash -c "$LOAD_CMD" >"$OUT/load.log" 2>&1 &
LOAD_PID=$!
sleep "$WARMUP"
kill -0 "$SPLITTER_PID" 2>/dev/null || die "the splitter exited: $(tail -3 "$OUT/splitter.log")"
echo "   $(grep -a 'splitter:' "$OUT/splitter.log" | tail -1)"

# --- record ----------------------------------------------------------------------------------
# cpu-clock: this VM has no hardware counters. dwarf: Rust omits frame pointers, so `-g` alone
# stops at the libc wrapper; dwarf unwinding from 16 KiB stack copies recovers full (and inlined)
# stacks. Attaching to the running splitter records only the steady state, not start-up.
echo "== recording $DURATION s (perf record -e cpu-clock --call-graph dwarf,16384 -F 999 -g)"
perf record -e cpu-clock --call-graph dwarf,16384 -F 999 -g -p "$SPLITTER_PID" -o "$DATA" \
    -- sleep "$DURATION" 2>"$OUT/perf-record.log" &
PERF_PID=$!
before=$(grep -c 'splitter:' "$OUT/splitter.log" || true)
wait "$PERF_PID" || die "perf record failed: $(tail -3 "$OUT/perf-record.log")"
PERF_PID=""
# The splitter's once-a-second status lines while recording: is the load what was asked for?
# (every peer should get every chunk: out ≈ peers × chunks/s, no send drops).
grep -a 'splitter:' "$OUT/splitter.log" | tail -n +"$((before + 1))" | sed 's/^/   /'
grep -a 'perf record:' "$OUT/perf-record.log" | sed 's/^/   /' || true

# The load and splitter are not needed for the analysis; stop them now (cleanup does the same).
stop_group "$LOAD_PID" INT 3 || stop_group "$LOAD_PID" KILL 2 || true
LOAD_PID=""
stop_group "$SPLITTER_PID" INT 5 || stop_group "$SPLITTER_PID" KILL 2 || true
SPLITTER_PID=""

# --- analyse ---------------------------------------------------------------------------------
echo "== flame graph"
timeout 600 perf script -i "$DATA" 2>/dev/null | inferno-collapse-perf >"$OUT/splitter.folded"
inferno-flamegraph --title "p2psp splitter: $PEERS peers, $BITRATE, team size $TEAM_SIZE" \
    <"$OUT/splitter.folded" >"$OUT/splitter.svg"
echo "   $OUT/splitter.svg ($(wc -l <"$OUT/splitter.folded") distinct stacks)"

echo "== top 15 symbols by self time (perf report --no-children --sort symbol)"
# (sed reads to the end: `head` would close the pipe early and pipefail would call that a failure.)
timeout 600 perf report -i "$DATA" --no-children --sort symbol --stdio -g none 2>/dev/null \
    | grep -v -e '^#' -e '^[[:space:]]*$' | sed -n '1,15p' \
    | sed 's/[[:space:]]*-[[:space:]]*-[[:space:]]*$//' | tee "$OUT/top.txt"

# cpu-clock counts nanoseconds, so a thread's total over the recording is its CPU time.
echo "== CPU by splitter thread (cores busy on average while recording, share of samples)"
awk -v secs="$DURATION" '{ n = $NF; split($1, f, ";"); t[f[1]] += n; all += n }
     END { for (k in t) printf "   %5.2f cores  %5.1f %%  %s\n", t[k] / 1e9 / secs, 100 * t[k] / all, k }' \
    "$OUT/splitter.folded" | sort -rn
