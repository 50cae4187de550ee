#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set everything up, then run the demo
# pipelines (a chain and a fan-out/fan-in on the wine dataset), rerun them to show
# reuse, change a param to show what re-executes and why.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh

millrace="$root/target/debug/millrace"
export MILLRACE_STATE="${MILLRACE_STATE:-$root/.millrace}"
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
echo
echo "demo: done. State is in $MILLRACE_STATE; try: $millrace runs show latest"
