# Shared by the load scripts in perf/ (sourced, not run). Expects IDLE_WAIT and NICE to be set.
# Sets: prefix (a `nice` command as root unless NICE is 0), here (the workspace), LOADGEN (built
# with cargo unless given), work (a temporary directory removed on exit). Defines idle_pct,
# wait_idle, median and field.

prefix=()
if [[ $(id -u) == 0 && $NICE != 0 ]]; then prefix=(nice -n "$NICE"); fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${LOADGEN:-}" ]]; then
    (cd "$here" && cargo build --release --workspace --quiet)
    target=${CARGO_TARGET_DIR:-$here/target}
    LOADGEN=$target/release/loadgen
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Idle share of all cores over one second, in percent.
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

# The median of the numbers on standard input, one per line ("-" if none).
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# A number in a top-level object of a loadgen JSON report (serde's pretty printing indents
# top-level keys by two spaces, nested ones by more): field FILE OBJECT KEY.
field() {
    awk -v obj="  \"$2\": {" -v key="\"$3\":" '
        index($0, obj) == 1 {f = 1; next}
        f && $1 == key {gsub(/[^0-9.eE+-]/, "", $2); v = ($2 == "" ? 0 : $2); exit}
        f && /^  [}]/ {exit}
        END {print (v == "" ? 0 : v)}' "$1"
}
