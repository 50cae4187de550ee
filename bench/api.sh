#!/usr/bin/env bash
# API latency benchmark: run detail and runs list with 10 000 runs in the database.
# Env: BENCH_RUNS=10000  BENCH_REQUESTS=300  BENCH_NO_BUILD=1  BENCH_KEEP=1
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/millrace"
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    (cd "$root" && cargo build --release -p millrace)
fi
work="$(mktemp -d)"
[[ "${BENCH_KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT
python3 "$root/bench/api.py" "$bin" "$work"
