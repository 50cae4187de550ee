#!/usr/bin/env bash
# The example pipelines and daemon configs against the JSON Schemas in docs/schema/,
# with taplo (npm's @taplo/cli, installed under the target dir), as an editor sees
# them: each file names its schema on its first line (`#:schema …`). The committed
# schemas are the parser's (`schema::tests::the_committed_schemas_are_the_generated_ones`;
# scripts/schema.sh rewrites them).
#   scripts/check-schema.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
if ! command -v npm >/dev/null; then
    sudo_=""; [[ $(id -u) -eq 0 ]] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node_dir="$target/tmp/taplo-node"
taplo="$node_dir/node_modules/.bin/taplo"
if [[ ! -x $taplo ]]; then
    mkdir -p "$node_dir"
    (cd "$node_dir" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund @taplo/cli@0.7 >/dev/null)
fi
cd "$root"
mapfile -t files < <(find config systemd -name '*.toml' | sort)
((${#files[@]})) || { echo "check-schema: no example files found" >&2; exit 1; }
for f in "${files[@]}"; do
    case "$(head -n 1 "$f")" in
        '#:schema '*/docs/schema/pipeline.schema.json | '#:schema '*/docs/schema/config.schema.json) ;;
        *) echo "check-schema: $f does not name its schema on its first line (#:schema …/docs/schema/….schema.json)" >&2; exit 1 ;;
    esac
done
# The schema named in each file's header (a relative path, as editors resolve it).
RUST_LOG=warn "$taplo" check "${files[@]}"
echo "check-schema: ${#files[@]} files valid against docs/schema/"
