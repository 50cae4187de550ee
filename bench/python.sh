#!/usr/bin/env bash
# Python step benchmark, both runtime variants: the warm interpreter (the snapshot with
# numpy, pandas and scikit-learn imported, `executor::snapshot`) and the base runtime
# (`[python] snapshot = false`). End to end through `millrace run`, on the demo's own
# pipelines (config/pipelines): a hello step, the 4-step `retrain.toml` (prepare, train,
# evaluate, publish) and the `score.toml` scoring step on the inbox. Prints one table:
# process wall time (`millrace run` start to exit), the step's own seconds, peak RSS,
# and the warm/base ratio. Then the scoring scenario under a running daemon: a new CSV
# dropped into the watched inbox/ → the scored CSV delivered to outbox/ (score.toml's
# watch trigger, its debounce set to BENCH_DEBOUNCE), timed from the drop to the file.
#
# Env: BENCH_REPS=5  BENCH_NO_BUILD=1 (skip the release build and `runtime prepare`)
#      BENCH_DEBOUNCE=1s (the scenario's debounce; the issue's figure)
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
    "$bin" runtime prepare --cache "$MILLRACE_CACHE" >/dev/null
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
                python3 -c 'import json,sys; print(json.dumps({s["name"]: (s["finished_at"] - s["started_at"]) / 1000 for s in json.load(sys.stdin)["steps"] if s.get("finished_at") and s.get("started_at")}))')
            log=$("$bin" --state "$work/state" logs latest "$( [[ $what == retrain ]] && echo train || echo "$what")" | grep -c "python: the warm interpreter" || true)
            echo "$variant $what $wall $rss $log $steps" >>"$work/results"
        done
    done
done
# The scoring scenario: one daemon per variant on the same state, the inbox watched.
debounce="${BENCH_DEBOUNCE:-1s}"
sed -i "s/^debounce = .*/debounce = \"$debounce\"/" "$work/score.toml"
port=$((20000 + RANDOM % 20000))
for variant in warm base; do
    printf '[api]\nlisten = "127.0.0.1:%s"\n' "$port" | cat "$variant.toml" - >"$work/daemon-$variant.toml"
    "$bin" --state "$work/state" daemon --config "$work/daemon-$variant.toml" >"$work/daemon-$variant.log" 2>&1 &
    daemon=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.1
    done
    # The watch has taken its first look (a file dropped before it is its baseline).
    for _ in $(seq 300); do
        curl -sf -H "Authorization: Bearer $(cat "$work/.state/api-token")" "http://127.0.0.1:$port/api/v1/status" |
            python3 -c 'import json,sys; sys.exit(0 if any(t["pipeline"] == "wine-score" and t["checks"] > 0 for t in json.load(sys.stdin)["counters"]["triggers"]) else 1)' && break
        sleep 0.1
    done
    # A first drop outside the clock: the daemon's first step loads the compiled runtime.
    for i in $(seq 0 "$reps"); do
        name="bench-$variant-$i.csv"
        # New content each time: an identical rewrite does not fire the trigger.
        python3 - "$work/drop-$name" "$i" <<'GEN'
import sys
rows = open("data/wine.csv").read().splitlines()
header, body = rows[0], rows[1:]
n = int(sys.argv[2])
open(sys.argv[1], "w").write("\n".join([header] + body[n * 7 % len(body):][:40] or body[:40]) + "\n")
GEN
        start=$(date +%s.%N)
        mv "$work/drop-$name" "$work/inbox/$name"
        for _ in $(seq 1200); do
            [[ -s "$work/outbox/$name" ]] && break
            sleep 0.01
        done
        end=$(date +%s.%N)
        [[ -s "$work/outbox/$name" ]] || { echo "bench: $name was not scored; daemon log:" >&2; cat "$work/daemon-$variant.log" >&2; kill "$daemon"; exit 1; }
        [[ $i == 0 ]] || echo "$variant $start $end" >>"$work/scenario"
    done
    kill "$daemon"
    wait "$daemon" || true
done
python3 - "$work/results" "$reps" "$work/scenario" "$debounce" <<'PY'
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
scen = {}
for line in open(sys.argv[3]):
    variant, start, end = line.split()
    scen.setdefault(variant, []).append(float(end) - float(start))
ws, bs = med(scen["warm"]), med(scen["base"])
print(f"{'scoring scenario, drop->out':<26} {ws:>8.3f} {bs:>8.3f} {bs / ws:>9.1f}x {'':>12} {'':>12}   <= 1.5 s (debounce {sys.argv[4]})")
for (variant, what), r in sorted(rows.items()):
    want = len(r) if variant == "warm" else 0
    if sum(x[2] for x in r) != want:
        print(f"MISMATCH: {variant} {what}: {sum(x[2] for x in r)} of {len(r)} runs on the warm interpreter")
        sys.exit(1)
PY
