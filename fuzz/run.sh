#!/usr/bin/env bash
# Runs every fuzz target for RUNS executions (default 10 million), one after the other, starting
# from the seeds (real captures) and the corpus grown so far. Stable Rust works through
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs nightly flags). Usage: fuzz/run.sh [RUNS] [TARGET...]
#
# Built with overflow checks (-a) and without AddressSanitizer (-s none): the fuzzed code is
# `#![forbid(unsafe_code)]` (proto, http, the control plane's classifier), so ASan finds nothing
# there that a panic would not, and it costs 3 to 5 times the speed. SANITIZER=address to use it.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
runs=${1:-10000000}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    start=$(date +%s)
    # -max_len: the UDP harnesses read programs; 4096 bytes is a long program.
    if cargo fuzz run -O -a -s "${SANITIZER:-none}" "$t" "corpus/$t" "seeds/$t" -- -runs="$runs" -max_len=4096 \
        -print_final_stats=1 >"logs/$t.log" 2>&1; then
        status=ok
    else
        status=FAILED
    fi
    end=$(date +%s)
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo '?')
    echo "$t: $status, $execs executions in $((end - start)) s (log: fuzz/logs/$t.log)"
done
