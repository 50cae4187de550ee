#!/usr/bin/env bash
# Container step overhead: start-to-exit of a trivial container step (`true` in the
# busybox test image) through millrace (Docker Engine API: create, attach, start,
# exit, inspect, remove), from the run record's step times; beside it, the same
# container by `podman run --rm` and the whole `millrace run` wall time.
#
# Env: BENCH_REPS=15  BENCH_NO_BUILD=1 (skip the release build)
# Needs the engine and image of scripts/setup-containers.sh (it is run here).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/millrace"
reps="${BENCH_REPS:-15}"
export "$("$root/scripts/setup-containers.sh")"
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    (cd "$root" && cargo build --release -p millrace)
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat >"$work/trivial.toml" <<TOML
[[step]]
name = "t"
container = { image = "localhost/millrace-busybox:1", command = ["true"] }
reuse = false
TOML
# One warm-up run (the engine's first container is slower).
"$bin" --state "$work/state" run "$work/trivial.toml" >/dev/null 2>&1
: >"$work/step.ms"
: >"$work/wall.ms"
for _ in $(seq "$reps"); do
    t0=$(date +%s%N)
    "$bin" --state "$work/state" run "$work/trivial.toml" >/dev/null 2>&1
    echo $((($(date +%s%N) - t0) / 1000000)) >>"$work/wall.ms"
    "$bin" --state "$work/state" --json runs show latest |
        python3 -c 'import json,sys; s=json.load(sys.stdin)["steps"][0]; print(s["finished_at"]-s["started_at"])' >>"$work/step.ms"
done
: >"$work/podman.ms"
if command -v podman >/dev/null; then
    for _ in $(seq "$reps"); do
        t0=$(date +%s%N)
        podman run --rm --network=none localhost/millrace-busybox:1 true
        echo $((($(date +%s%N) - t0) / 1000000)) >>"$work/podman.ms"
    done
fi
python3 - "$work" "$reps" <<'PY'
import statistics, sys
work, reps = sys.argv[1], sys.argv[2]
def row(name, f, note):
    v = sorted(int(x) for x in open(f"{work}/{f}").read().split())
    if not v:
        return
    p90 = v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))]
    print(f"| {name} | {min(v)} | {statistics.median(v):.0f} | {p90} | {max(v)} | {note} |")
print(f"container step overhead, {reps} runs each (ms)\n")
print("| what | min | p50 | p90 | max | |")
print("|---|---|---|---|---|---|")
row("millrace step, start → exit", "step.ms", "target ≤ 300 ms p50")
row("`millrace run` wall time", "wall.ms", "process start, SQLite, plan, image resolve, step")
row("`podman run --rm` (CLI)", "podman.ms", "for comparison")
PY
