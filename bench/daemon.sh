#!/usr/bin/env bash
# millrace daemon benchmark: idle footprint with 50 loaded pipelines, and the latency of
# cron, REST and file-drop triggers to the first step's start (see bench/README.md,
# "Daemon benchmark"). The driving logic is bench/daemon.py (python3, std-lib only).
#
# Env: BENCH_IDLE_SECS=60  BENCH_IDLE_AFTER_SECS=$BENCH_IDLE_SECS  BENCH_IDLE_PIPELINES=50
#      BENCH_CRON_FIRINGS=30
#      BENCH_API_RUNS=50   BENCH_DROP_RUNS=10     BENCH_PHASES="idle api drop cron"
#      BENCH_STRACE=1      (after the latency phases: `strace -c -f` on the idle daemon
#                           for BENCH_STRACE_SECS=20 s)
#      BENCH_NO_BUILD=1    (skip the cargo / plugin builds)
#      BENCH_KEEP=1        (keep the temp dir: pipelines, state dir, daemon.log, results.json)
#      TMPDIR              (where the temp dir goes; default /tmp)
# Exits 1 if a run fails, the daemon misbehaves or a number is missing. Targets are
# informational, as in bench/run.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/millrace"
noop="$root/plugins/dist/noop.wasm"
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    echo "bench: building millrace (release) and the plugins" >&2
    (cd "$root" && cargo build --release -p millrace)
    "$root/scripts/build-plugins.sh" >/dev/null
fi
[[ -x "$bin" ]] || { echo "bench: $bin is missing" >&2; exit 1; }
[[ -f "$noop" ]] || { echo "bench: $noop is missing" >&2; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/millrace-daemon-bench.XXXXXX")"
cleanup() {
    # The driver stops the daemon; this is for when the driver itself was killed.
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
echo "bench: work dir $tmp ($(stat -f -c %T "$tmp") file system)" >&2

python3 "$root/bench/daemon.py" "$tmp" "$bin" "$noop"
