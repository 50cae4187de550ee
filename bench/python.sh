#!/usr/bin/env bash
# Python step benchmark, both runtime variants: the warm interpreter (the snapshot with
# numpy, pandas and scikit-learn imported, `executor::snapshot`) and the base runtime
# (`[python] snapshot = false`). End to end through `millrace run`, on the demo's own
# pipelines (config/pipelines): a hello step, the 4-step `retrain.toml` (prepare, train,
# evaluate, publish) and the `score.toml` scoring step on the inbox. Prints one table:
# process wall time (`millrace run` start to exit), the step's own seconds, peak RSS,
# and the warm/base ratio.
#
# Env: BENCH_REPS=5  BENCH_NO_BUILD=1 (skip the release build and `runtime prepare`)
#      BENCH_BIN=target/debug/millrace (another binary; the guest code is the same)
# Uses the precompiled runtime and snapshot in target/tmp/millrace-cache
# (scripts/setup.sh makes them; without BENCH_NO_BUILD this script does too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${BENCH_BIN:-$root/target/release/millrace}"
reps="${BENCH_REPS:-5}"
export MILLRACE_CACHE="${MILLRACE_CACHE:-$root/target/tmp/millrace-cache}"
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    (cd "$root" && cargo build --release -p millrace)
    "$root/scripts/fetch-python-runtime.sh" >/dev/null
    "$bin" --state "$root/target/tmp/prepare-state" runtime prepare >/dev/null
fi
[[ -x /usr/bin/time ]] || { echo "bench: /usr/bin/time is required (apt-get install time)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$root/config/pipelines/." "$work/"
cp -r "$root/bench/python" "$work/bench"
cat >"$work/hello.toml" <<TOML
[[step]]
name = "hello"
python = { script = "hello.py", code = "bench" }
reuse = false
TOML
printf 'pipelines = "."\nstate_dir = ".state"\n[python]\nsnapshot = false\n' >"$work/base.toml"
printf 'pipelines = "."\nstate_dir = ".state"\n' >"$work/warm.toml"
cd "$work"
# One run of each on each variant first: the publish step writes the model that
# score.toml reads, and every compile is done before the clock starts.
for variant in warm base; do
    "$bin" --state "$work/state" run retrain.toml --config "$variant.toml" >/dev/null 2>&1
    "$bin" --state "$work/state" run score.toml --config "$variant.toml" >/dev/null 2>&1
done
for variant in warm base; do
    for what in hello retrain score; do
        for i in $(seq "$reps"); do
            /usr/bin/time -f "%e %M" -o "$work/time" "$bin" --state "$work/state" --json \
                run "$what.toml" --no-reuse --config "$variant.toml" >"$work/out.json"
            read -r wall rss <"$work/time"
            steps=$("$bin" --state "$work/state" --json runs show latest |
                python3 -c 'import json,sys; print(json.dumps({s["step"]["name"]: (s["step"]["finished_at"] - s["step"]["started_at"]) / 1000 for s in json.load(sys.stdin)["steps"] if s["step"].get("finished_at") and s["step"].get("started_at")}))')
            log=$("$bin" --state "$work/state" logs latest "$( [[ $what == retrain ]] && echo train || echo "$what")" | grep -c "python: the warm interpreter" || true)
            echo "$variant $what $wall $rss $log $steps" >>"$work/results"
        done
    done
done
python3 - "$work/results" "$reps" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    variant, what, wall, rss, warm, steps = line.split(" ", 5)
    rows.setdefault((variant, what), []).append((float(wall), int(rss) / 1024, int(warm), json.loads(steps)))
med = statistics.median
def step_s(r, name):
    xs = [x[3].get(name) for x in r if x[3].get(name) is not None]
    return med(xs) if xs else float("nan")
print(f"python steps, median of {sys.argv[2]} (process = `millrace run` start to exit; step = the step's own seconds)")
print(f"{'row':<26} {'warm s':>8} {'base s':>8} {'base/warm':>10} {'warm RSS MB':>12} {'base RSS MB':>12}   target (warm)")
def row(label, what, get, target):
    w, b = rows[("warm", what)], rows[("base", what)]
    ws, bs = get(w), get(b)
    print(f"{label:<26} {ws:>8.3f} {bs:>8.3f} {bs / ws if ws else float('nan'):>9.1f}x "
          f"{med([x[1] for x in w]):>12.1f} {med([x[1] for x in b]):>12.1f}   {target}")
row("hello, process", "hello", lambda r: med([x[0] for x in r]), "<= 0.1 s")
row("hello, step", "hello", lambda r: step_s(r, "hello"), "")
row("score, process", "score", lambda r: med([x[0] for x in r]), "")
row("score, step", "score", lambda r: step_s(r, "score"), "<= 0.3 s")
row("retrain (4 steps), process", "retrain", lambda r: med([x[0] for x in r]), "<= 2 s")
row("train, step", "retrain", lambda r: step_s(r, "train"), "<= 1.0 s")
for (variant, what), r in sorted(rows.items()):
    want = len(r) if variant == "warm" else 0
    if sum(x[2] for x in r) != want:
        print(f"MISMATCH: {variant} {what}: {sum(x[2] for x in r)} of {len(r)} runs on the warm interpreter")
        sys.exit(1)
PY
