#!/usr/bin/env bash
# Python step benchmark: wall time and peak RSS of `millrace run` for a hello step and
# for a scikit-learn train step on the wine data, with the train step's split between
# interpreter start, imports and work (the script reports its own timings as metrics).
#
# Env: BENCH_REPS=5  BENCH_NO_BUILD=1 (skip the release build)
# Uses the precompiled runtime in target/tmp/millrace-cache (scripts/setup.sh makes it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/millrace"
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
cp -r "$root/bench/python" "$work/code"
cp "$root/config/pipelines/data/wine.csv" "$work/wine.csv"
cat >"$work/hello.toml" <<TOML
[[step]]
name = "hello"
python = { script = "hello.py", code = "code" }
reuse = false
TOML
cat >"$work/train.toml" <<TOML
[inputs.wine]
path = "wine.csv"
[[step]]
name = "train"
python = { script = "train.py", code = "code" }
inputs = { wine = "inputs.wine" }
reuse = false
TOML
for what in hello train; do
    for i in $(seq "$reps"); do
        /usr/bin/time -f "%e %M" -o "$work/time" "$bin" --state "$work/state" --json run "$work/$what.toml" >"$work/out.json"
        read -r wall rss <"$work/time"
        step_s=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$work/out.json")
        if [[ $what == train ]]; then
            metrics=$("$bin" --state "$work/state" --json metrics latest |
                python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))')
        else
            metrics="[]"
        fi
        echo "$what $wall $rss $step_s $metrics" >>"$work/results"
    done
done
python3 - "$work/results" "$reps" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    what, wall, rss, run_s, metrics = line.split(" ", 4)
    m = {}
    for run in json.loads(metrics) if metrics.strip() else []:
        for r in run.get("metrics", []):
            m[r.get("name")] = r.get("value")
    rows.setdefault(what, []).append((float(wall), int(rss) / 1024, float(run_s), m))
med = lambda xs: statistics.median(xs)
print(f"python steps, median of {sys.argv[2]} (process wall = `millrace run` start to exit)")
print(f"{'step':<8} {'process s':>10} {'run s':>8} {'peak RSS MB':>12}   target")
for what, target in [("hello", "<= 0.100 s"), ("train", "<= 2.5 s")]:
    r = rows[what]
    print(f"{what:<8} {med([x[0] for x in r]):>10.3f} {med([x[2] for x in r]):>8.3f} {med([x[1] for x in r]):>12.1f}   {target}")
t = rows["train"]
def metric(name):
    vals = [x[3].get(name) for x in t if x[3].get(name) is not None]
    return med(vals) if vals else float("nan")
imp_pd, imp_sk, work = metric("import_pandas_s"), metric("import_sklearn_s"), metric("work_s")
run_s = med([x[2] for x in t])
print(f"train split: start+instantiate+teardown {run_s - imp_pd - imp_sk - work:.3f} s, import pandas {imp_pd:.3f} s, "
      f"import sklearn {imp_sk:.3f} s, read+fit+score {work:.3f} s (accuracy {metric('accuracy'):.3f})")
PY
