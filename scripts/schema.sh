#!/usr/bin/env bash
# Rewrites docs/schema/*.schema.json from the parser (`millrace schema`): run it after
# a key is added to or removed from the pipeline file or the daemon config, and commit
# the result (`schema::tests::the_committed_schemas_are_the_generated_ones` checks).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build -q -p millrace
bin="${CARGO_TARGET_DIR:-$root/target}/debug/millrace"
for which in pipeline config; do
    "$bin" schema "$which" >"docs/schema/$which.schema.json.tmp"
    mv "docs/schema/$which.schema.json.tmp" "docs/schema/$which.schema.json"
    echo "docs/schema/$which.schema.json"
done
