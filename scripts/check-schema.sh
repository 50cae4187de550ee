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

# The rejected golden cases (daemon/tests/ui/*.toml): those whose mistake a schema can
# express (an unknown key, a wrong type or value, two kinds in one step, broken TOML)
# must fail it too; the others (references, cycles, paths, durations, names) are
# well-formed and must pass it, so the schema is not stricter than the parser.
schema_rejects=(bad_trigger concurrency_mistakes container_mistakes invalid_toml invalid_utf8
    transfer_mode two_kinds unknown_compute unknown_key wrong_type)
pipeline_schema="file://$root/docs/schema/pipeline.schema.json"
for f in daemon/tests/ui/*.toml; do
    name="$(basename "$f" .toml)"
    if RUST_LOG=off "$taplo" check --schema "$pipeline_schema" "$f" >/dev/null 2>&1; then
        verdict=accepted
    else
        verdict=rejected
    fi
    want=accepted
    [[ " ${schema_rejects[*]} " == *" $name "* ]] && want=rejected
    if [[ $verdict != "$want" ]]; then
        echo "check-schema: the schema $verdict $f, which it should have $want ($name.err says why the parser refuses it)" >&2
        RUST_LOG=warn "$taplo" check --schema "$pipeline_schema" "$f" >&2 || true
        exit 1
    fi
done
echo "check-schema: the golden cases: ${#schema_rejects[@]} rejected by the schema as by the parser, the rest well-formed"
