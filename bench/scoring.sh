#!/usr/bin/env bash
# Incremental batch scoring benchmark: an inbox of BENCH_INBOX (1000) scored files under
# the daemon, then one file dropped: the time to its scored output, the items executed
# (exactly 1) and the orchestration overhead around the item (see bench/README.md,
# "Scoring benchmark"). The driving logic is bench/scoring.py (python3, std-lib only).
#
# Env: BENCH_INBOX=1000  BENCH_DROPS=5  BENCH_SCORERS="wasm python"  BENCH_DEBOUNCE_MS=200
#      BENCH_BIN=path      (a millrace binary to measure instead of target/release's)
#      BENCH_NO_BUILD=1    (skip the cargo / plugin builds)
#      BENCH_KEEP=1        (keep the temp dir: pipelines, state dirs, daemon.log, results.json)
#      MILLRACE_CACHE      (the compiled Python runtime; default target/tmp/millrace-cache,
#                           which scripts/setup.sh fills)
# Exits 1 if a run fails or a drop does not execute exactly one item.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin="${BENCH_BIN:-$target_dir/release/millrace}"
copy="$root/plugins/dist/copy.wasm"
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    echo "bench: building millrace (release) and the plugins" >&2
    (cd "$root" && cargo build --release -p millrace)
    "$root/scripts/build-plugins.sh" >/dev/null
fi
[[ -x "$bin" ]] || { echo "bench: $bin is missing" >&2; exit 1; }
[[ -f "$copy" ]] || { echo "bench: $copy is missing" >&2; exit 1; }
export MILLRACE_CACHE="${MILLRACE_CACHE:-$target_dir/tmp/millrace-cache}"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/millrace-scoring-bench.XXXXXX")"
cleanup() {
    local pid
    pid="$(cat "$tmp/daemon.pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
        echo "bench: kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
echo "bench: work dir $tmp, binary $bin" >&2

python3 "$root/bench/scoring.py" "$tmp" "$bin" "$copy"
