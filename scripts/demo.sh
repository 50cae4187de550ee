#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set everything up, then run the demo
# pipelines (a chain and a fan-out/fan-in on the wine dataset), rerun them to show
# reuse, change a param to show what re-executes and why; retrain a scikit-learn
# model in Python twice and compare the runs, score an inbox with it; a graph mixing
# WASM, Python and a container; a train step on a Slurm cluster; then the daemon.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
# A container engine for the container step of report.toml (podman, unless
# DOCKER_HOST already names one), and its registry-free image.
export "$(scripts/setup-containers.sh)"
# A single-node Slurm cluster for the step that trains on it.
scripts/setup-slurm.sh >/dev/null

target_dir="${CARGO_TARGET_DIR:-$root/target}"
millrace="$target_dir/debug/millrace"
export MILLRACE_STATE="${MILLRACE_STATE:-$root/.millrace}"
# The Python runtime compiled by setup.sh.
export MILLRACE_CACHE="${MILLRACE_CACHE:-$target_dir/tmp/millrace-cache}"
pipelines="$root/config/pipelines"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "validate every example pipeline"
"$millrace" validate "$pipelines"
say "the fan-out/fan-in graph"
"$millrace" graph "$pipelines/fanout.toml"
say "run the chain (clean → standardize → stats → publish)"
"$millrace" run "$pipelines/chain.toml"
say "run the fan-out (4 parallel shards, then joins)"
"$millrace" run "$pipelines/fanout.toml"
say "run both again: nothing changed, every step is reused"
"$millrace" run "$pipelines/chain.toml"
"$millrace" run "$pipelines/fanout.toml"
say "plan with another param, then run it: only what depends on it executes"
"$millrace" plan "$pipelines/chain.toml" --param min_alcohol=12.5
"$millrace" run "$pipelines/chain.toml" --param min_alcohol=12.5
"$millrace" explain latest clean
say "history and metrics"
"$millrace" runs
chain_runs=$("$millrace" --json runs --pipeline wine-chain --limit 2 | python3 -c 'import json,sys; print(" ".join(str(r["id"]) for r in json.load(sys.stdin)))')
# shellcheck disable=SC2086
"$millrace" metrics $chain_runs
say "the published summary (config/pipelines/published/wine-stats/stats.json)"
head -c 400 "$pipelines/published/wine-stats/stats.json"; echo

say "Python: retrain a scikit-learn model (in the WASI sandbox) with two values of C; prepare does not use C, so the second run reuses it"
"$millrace" run "$pipelines/retrain.toml"
"$millrace" plan "$pipelines/retrain.toml" --param c=0.05
"$millrace" run "$pipelines/retrain.toml" --param c=0.05
retrain_runs=$("$millrace" --json runs --pipeline wine-retrain --limit 2 | python3 -c 'import json,sys; print(" ".join(str(r["id"]) for r in json.load(sys.stdin)))')
# shellcheck disable=SC2086
"$millrace" metrics $retrain_runs
say "batch scoring: each CSV of the inbox scored with the published model (config/pipelines/outbox/)"
"$millrace" run "$pipelines/score.toml"
head -4 "$pipelines/outbox/batch-001.csv"
say "a new CSV in the inbox: only it is scored (one item executes, the others are reused) and merged into outbox/"
drop="$pipelines/inbox/batch-demo.csv"
trap 'rm -f "$drop"' EXIT
head -21 "$pipelines/inbox/batch-001.csv" >"$drop"
"$millrace" plan "$pipelines/score.toml"
"$millrace" run "$pipelines/score.toml"
rm -f "$drop"
trap - EXIT
ls "$pipelines/outbox"

say "three runtimes in one graph: clean (WASM) → profile (Python) → render (container) → publish"
"$millrace" run "$pipelines/report.toml"
"$millrace" runs show latest
cat "$pipelines/published/wine-report/report.txt"

say "Slurm: retrain with the train step submitted to a (single-node) Slurm cluster"
"$millrace" run "$root/config/cluster/retrain-on-slurm.toml" --config "$root/config/cluster/millrace.toml"
"$millrace" runs show latest

say "the daemon: loads config/pipelines, fires their triggers, serves the REST API"
config="$MILLRACE_STATE/demo-daemon.toml"
cat >"$config" <<CONFIG
# Written by scripts/demo.sh; config/millrace.toml is the documented example.
pipelines = "$pipelines"
state_dir = "$MILLRACE_STATE"
shutdown_grace = "10s"
[api]
listen = "127.0.0.1:0"     # any free port: clients find it in state_dir/daemon.json
CONFIG
rm -f "$MILLRACE_STATE/daemon.json"
"$millrace" daemon --config "$config" 2>"$MILLRACE_STATE/daemon.log" &
daemon_pid=$!
trap 'kill "$daemon_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [[ -s "$MILLRACE_STATE/daemon.json" ]] && break; sleep 0.1; done
"$millrace" status --config "$config"
say "the cron triggers' next firings, and the nightly one across a DST change"
"$millrace" schedule --config "$config" --count 3
"$millrace" schedule --config "$config" --simulate 2026-03-28 2026-03-31
say "trigger wine-chain through the API; its success fires wine-fanout (after = \"wine-chain\")"
"$millrace" trigger wine-chain --config "$config" --param min_alcohol=12 --wait
last_fanout() {
    "$millrace" --json runs --pipeline wine-fanout --limit 1 |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["status"] if r and r[0]["trigger"].startswith("after") else "")'
}
for _ in $(seq 300); do
    case "$(last_fanout)" in succeeded | failed) break ;; esac
    sleep 0.1
done
"$millrace" runs --limit 4
say "drop a CSV into the watched inbox: the daemon scores just that file"
drop="$pipelines/inbox/batch-drop.csv"
trap 'rm -f "$drop"; kill "$daemon_pid" 2>/dev/null || true' EXIT
last_score() {
    "$millrace" --json runs --pipeline wine-score --limit 1 |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print("%d %s" % (r[0]["id"], r[0]["status"]) if r and r[0]["trigger"].startswith("watch") else "")'
}
head -11 "$pipelines/inbox/batch-001.csv" >"$drop"
for _ in $(seq 600); do
    case "$(last_score)" in *succeeded | *failed) break ;; esac
    sleep 0.1
done
"$millrace" runs show "$(last_score | cut -d' ' -f1)"
rm -f "$drop"
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
trap - EXIT
echo "(the daemon's log: $MILLRACE_STATE/daemon.log)"
echo
echo "demo: done. State is in $MILLRACE_STATE; try: $millrace runs show latest"
