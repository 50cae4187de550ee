#!/usr/bin/env bash
# Builds the WASI plugins (plugins/, a cargo workspace of its own) and copies them to
# plugins/dist/<binary>.wasm: wasm32-wasip2 components for every binary, plus
# wasm32-wasip1 core modules of noop and fail (plugins/dist/noop-p1.wasm, fail-p1.wasm), to
# test core-module support (and exact exit codes: a wasip2 component can only report
# success or failure through wasi:cli/exit, a wasip1 module's proc_exit carries the code).
# Runnable from any directory. Extra arguments go to both `cargo build` calls
# (e.g. --offline, --locked).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plugins="$root/plugins"
dist="$plugins/dist"
target_dir="${CARGO_TARGET_DIR:-$plugins/target}"

# Quiet, and a no-op (also offline) when the targets are installed already.
if ! rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null 2>&1; then
    installed="$(rustup target list --installed 2>/dev/null || true)"
    for t in wasm32-wasip2 wasm32-wasip1; do
        grep -qx "$t" <<<"$installed" || { echo "build-plugins: rust target $t is missing and could not be installed (rustup target add $t)" >&2; exit 1; }
    done
fi

cd "$plugins"
cargo build --release --target wasm32-wasip2 --workspace --bins "$@"
cargo build --release --target wasm32-wasip1 -p testkit --bin noop --bin fail --bin sleep --bin attack "$@"

mkdir -p "$dist"
rm -f "$dist"/*.wasm
bins=(csv-clean csv-stats csv-standardize csv-join noop copy fail flaky sleep spin alloc escape env chatty attack)
for b in "${bins[@]}"; do
    cp "$target_dir/wasm32-wasip2/release/$b.wasm" "$dist/$b.wasm"
done
for b in noop fail sleep attack; do
    cp "$target_dir/wasm32-wasip1/release/$b.wasm" "$dist/$b-p1.wasm"
done

# Every wasip2 binary in the target dir must be in the list above.
for f in "$target_dir"/wasm32-wasip2/release/*.wasm; do
    [[ -e "$dist/$(basename "$f")" ]] || { echo "build-plugins: $(basename "$f") is built but not in the list in $0" >&2; exit 1; }
done

echo "build-plugins: $(ls "$dist" | wc -l) plugins in ${dist#"$root"/}:"
ls -l "$dist" | awk 'NR > 1 { printf "  %-24s %8d bytes\n", $9, $5 }'
