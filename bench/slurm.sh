#!/usr/bin/env bash
# Slurm step overhead: start-to-finish of a trivial wasm step (copy one small file:
# submit, schedule, exec-step on the node, output back and captured) on the
# single-node Slurm cluster of scripts/setup-slurm.sh, against the same step run
# locally, from the run record's step times.
#
# Env: BENCH_REPS=10  BENCH_NO_BUILD=1 (skip the release build)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/millrace"
reps="${BENCH_REPS:-10}"
"$root/scripts/setup-slurm.sh" >/dev/null
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    (cd "$root" && cargo build --release -p millrace && scripts/build-plugins.sh --quiet)
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo payload >"$work/data.txt"
cat >"$work/millrace.toml" <<TOML
pipelines = "pipelines"
state_dir = "state"
[compute.cluster]
kind = "slurm"
shared_dir = "shared"
TOML
for where in local cluster; do
    compute=""
    [[ $where == cluster ]] && compute='compute = "cluster"'
    cat >"$work/$where.toml" <<TOML
[inputs.x]
path = "data.txt"
[[step]]
name = "copy"
wasm = "$root/plugins/dist/copy.wasm"
inputs = { x = "inputs.x" }
outputs = ["out"]
reuse = false
$compute
TOML
    # One warm-up run (the first compile of the plugin).
    "$bin" --state "$work/state" run "$work/$where.toml" --config "$work/millrace.toml" >/dev/null 2>&1
    : >"$work/$where.ms"
    for _ in $(seq "$reps"); do
        "$bin" --state "$work/state" run "$work/$where.toml" --config "$work/millrace.toml" >/dev/null 2>&1
        "$bin" --state "$work/state" --json runs show latest |
            python3 -c 'import json,sys; s=json.load(sys.stdin)["steps"][0]; print(s["finished_at"]-s["started_at"])' >>"$work/$where.ms"
    done
done
python3 - "$work" "$reps" <<'PY'
import statistics, sys
work, reps = sys.argv[1], sys.argv[2]
print(f"trivial step, start → output captured, {reps} runs each (ms)\n")
print("| where | min | p50 | max |")
print("|---|---|---|---|")
for w in ("local", "cluster"):
    v = sorted(int(x) for x in open(f"{work}/{w}.ms").read().split())
    print(f"| {w} | {min(v)} | {statistics.median(v):.0f} | {max(v)} |")
PY
