#!/usr/bin/env bash
# Every test: set up (targets, plugins), then the plugins' unit tests, the daemon's
# unit tests and its one integration-test binary (real binary, wasmtime, SQLite).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
echo "== plugin unit tests"
(cd plugins && cargo test --quiet --target x86_64-unknown-linux-gnu -p csvkit)
echo "== millrace tests"
cargo test --workspace
echo "== systemd unit"
scripts/check-systemd.sh
