#!/usr/bin/env bash
# millrace benchmark: orchestration overhead of trivial WASM steps (see bench/README.md).
#
# For each shape (chain, fanout) and size N, with a fresh state dir per repetition:
#   cold    first run             -> expect executed == N
#   noop    same run again        -> expect executed == 0
#   change  one input rewritten   -> expect executed == N (chain) / 2 (fanout)
# Prints median wall time, ms/step, executed count and peak RSS per phase; exits 1 on any
# mismatch or failed run.
#
# Env: BENCH_SIZES="100 1000"  BENCH_REPS=3  BENCH_SHAPES="chain fanout"
#      BENCH_RUN_ARGS=""  (extra `millrace run` args, e.g. "--max-parallel 4")
#      BENCH_NO_BUILD=1   (skip the cargo / plugin builds)
#      BENCH_BIN=PATH     (another millrace binary, e.g. a copy of the one before a change;
#                          implies nothing about building: pair it with BENCH_NO_BUILD=1)
#      BENCH_KEEP=1       (keep the temp dir with pipelines, state dirs and logs)
#      TMPDIR             (where the pipelines and state dirs go; default /tmp)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="$root/bench"
bin="${BENCH_BIN:-$root/target/release/millrace}"
wasm="$root/plugins/dist/copy.wasm"

sizes="${BENCH_SIZES:-100 1000}"
reps="${BENCH_REPS:-3}"
shapes="${BENCH_SHAPES:-chain fanout}"
read -r -a run_args <<<"${BENCH_RUN_ARGS:-}"

# GNU time for peak RSS.
if [[ ! -x /usr/bin/time ]]; then
    echo "bench: installing GNU time (/usr/bin/time)" >&2
    sudo_=""
    [[ $(id -u) -eq 0 ]] || sudo_="sudo"
    $sudo_ apt-get install -y time >/dev/null
fi
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    echo "bench: building millrace (release) and the plugins" >&2
    (cd "$root" && cargo build --release -p millrace)
    "$root/scripts/build-plugins.sh" >/dev/null
fi
[[ -x "$bin" ]] || { echo "bench: $bin is missing" >&2; exit 1; }
[[ -f "$wasm" ]] || { echo "bench: $wasm is missing" >&2; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/millrace-bench.XXXXXX")"
if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
    echo "bench: keeping $tmp" >&2
else
    trap 'rm -rf "$tmp"' EXIT
fi
echo "bench: work dir $tmp ($(stat -f -c %T "$tmp") file system; set TMPDIR to move it)" >&2
results="$tmp/results.tsv"
printf 'shape\tn\tphase\trep\twall\texecuted\trss_kb\tstatus\n' >"$results"

# run_phase SHAPE N REP PHASE DIR: one `millrace run`, one line of results.tsv.
run_phase() {
    local shape=$1 n=$2 rep=$3 phase=$4 dir=$5
    local out="$dir/$phase.json" err="$dir/$phase.err" tm="$dir/$phase.time"
    local cmd=("$bin" --state "$dir/state" --json run "${run_args[@]}" "$dir/pipeline.toml")
    local rc=0 t0 t1
    t0=$EPOCHREALTIME
    /usr/bin/time -f %M -o "$tm" "${cmd[@]}" >"$out" 2>"$err" || rc=$?
    t1=$EPOCHREALTIME
    local wall rss executed status
    wall=$(python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.4f}")' "$t0" "$t1")
    rss=$(tail -n 1 "$tm")
    read -r executed status < <(python3 -c '
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(d.get("executed", -1), d.get("status", "?"))
except Exception:
    print(-1, "no-json")
' "$out")
    if [[ $rc -ne 0 || "$status" != succeeded ]]; then
        {
            echo "bench: $shape N=$n rep $rep $phase: exit $rc, status $status"
            echo "  command: ${cmd[*]}"
            echo "  stdout (head):"; head -n 20 "$out" | sed 's/^/    /'
            echo "  stderr (tail):"; tail -n 20 "$err" | sed 's/^/    /'
        } >&2
        [[ "$status" == succeeded ]] || status="${status}(exit $rc)"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$shape" "$n" "$phase" "$rep" "$wall" "$executed" "$rss" "$status" >>"$results"
    printf 'bench: %-6s N=%-5s rep %s %-6s %7.3fs executed=%s status=%s\n' "$shape" "$n" "$rep" "$phase" "$wall" "$executed" "$status" >&2
}

for shape in $shapes; do
    for n in $sizes; do
        for ((rep = 1; rep <= reps; rep++)); do
            dir="$tmp/$shape-$n-r$rep"
            python3 "$bench/gen.py" "$shape" "$n" "$dir" "$wasm" >/dev/null
            run_phase "$shape" "$n" "$rep" cold "$dir"
            run_phase "$shape" "$n" "$rep" noop "$dir"
            python3 "$bench/gen.py" change "$shape" "$n" "$dir" >/dev/null
            run_phase "$shape" "$n" "$rep" change "$dir"
            [[ "${BENCH_KEEP:-0}" == 1 ]] || rm -rf "$dir"
        done
    done
done

echo
python3 "$bench/report.py" "$results"
