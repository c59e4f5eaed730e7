#!/usr/bin/env bash
# The NTS success matrix through the NAT lab (docs/nat.md, "The success matrix"): teams of
# PER_KIND peers per NAT kind, one after another, until every ordered pair of NAT kinds has at
# least PAIRS pairs of peers; the tables go to the terminal and to OUT, with the date, commit
# and the machine's load average (sampled every 30 s while it runs).
#
#   sudo perf/nat-matrix.sh [PAIRS=100] [PER_KIND=5] [OUT=perf/out/nat-matrix-DATE.txt]
#
# Passed through: NTS_MATRIX_LOSS (per mille of UDP each NAT drops), NTS_MATRIX_SEED (join
# orders), NTS_MATRIX_MAX_RUNS (most teams, default 40), NTS_MATRIX_MAX_MINUTES (no new team
# after that, default 60). Needs root, iproute2 and nftables. Exit code: the test's (non-zero
# when a pair was served by neither direct links nor the fallback, or PAIRS was not reached).
set -euo pipefail
PAIRS=${1:-100}; PER_KIND=${2:-5}
cd "$(dirname "$0")/.."
OUT=${3:-perf/out/nat-matrix-$(date -u +%Y%m%dT%H%M%SZ).txt}
if [[ $(id -u) != 0 ]]; then
    echo "nat-matrix.sh: the NAT lab needs root (network namespaces, nftables)" >&2
    exit 2
fi
mkdir -p "$(dirname "$OUT")"
cargo test --release --test nat --no-run -q 2>&1 | tail -n 3
loads=$(mktemp)
sampler=
cleanup() {
    if [[ -n $sampler ]]; then kill "$sampler" 2>/dev/null || true; fi
    rm -f "$loads"
}
trap cleanup EXIT
(while :; do cut -d' ' -f1 /proc/loadavg >>"$loads"; sleep 30; done) &
sampler=$!
{
    echo "# $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# NTS_MATRIX_PAIRS=$PAIRS NTS_MATRIX_PER_KIND=$PER_KIND NTS_MATRIX_LOSS=${NTS_MATRIX_LOSS:-0} cargo test --release --test nat nts_success_matrix -- --ignored --nocapture"
} | tee "$OUT"
start=$SECONDS
set +e
NTS_MATRIX_PAIRS=$PAIRS NTS_MATRIX_PER_KIND=$PER_KIND \
    cargo test --release --test nat nts_success_matrix -- --ignored --nocapture 2>&1 | tee -a "$OUT"
status=${PIPESTATUS[0]}
set -e
sort -g "$loads" | awk -v s=$((SECONDS - start)) '{v[NR] = $1} END {
    printf "# %d s; 1-minute load average every 30 s: min %s, median %s, max %s (%d samples)\n",
        s, v[1], v[int((NR + 1) / 2)], v[NR], NR }' | tee -a "$OUT"
echo "# tables in $OUT"
exit "$status"
