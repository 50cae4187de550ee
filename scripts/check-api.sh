#!/usr/bin/env bash
# Checks the daemon's REST API against its own OpenAPI document with schemathesis
# (PyPI): a real daemon on a temporary state dir, with a pipeline that has run, is
# fuzzed from /api/v1/openapi.json. Any 5xx, any response that breaks the schema, any
# schema-valid request refused or invalid one accepted fails the check.
#   scripts/check-api.sh [MILLRACE_BINARY]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/debug/millrace}"
# schemathesis in a venv of its own (a Debian python refuses system-wide pip installs).
venv="${CARGO_TARGET_DIR:-$root/target}/tmp/schemathesis-venv"
if [[ ! -x "$venv/bin/schemathesis" ]]; then
    echo "check-api: installing schemathesis into $venv" >&2
    if ! python3 -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        fi
        python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check schemathesis
fi
st="$venv/bin/schemathesis"
work="$(mktemp -d)"
pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/pipelines"
cat >"$work/millrace.toml" <<TOML
pipelines = "pipelines"
state_dir = "state"
[api]
listen = "127.0.0.1:0"
TOML
cat >"$work/pipelines/api-check.toml" <<TOML
[params]
c = 0.5
[[step]]
name = "a"
wasm = "$root/plugins/dist/noop.wasm"
TOML
"$bin" daemon --config "$work/millrace.toml" 2>"$work/daemon.log" &
pid=$!
for _ in $(seq 100); do [[ -s "$work/state/daemon.json" ]] && break; sleep 0.1; done
url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$work/state/daemon.json")
token=$(cat "$work/state/api-token")
"$bin" trigger api-check --config "$work/millrace.toml" --wait >/dev/null
cd "$work" # schemathesis keeps its state in ./.schemathesis
if ! "$st" run "$url/api/v1/openapi.json" --header "Authorization: Bearer $token" \
    --checks all --max-examples 60 >"$work/report.txt" 2>&1; then
    cat "$work/report.txt"
    echo "check-api: FAIL (daemon log: $(tail -5 "$work/daemon.log"))" >&2
    exit 1
fi
echo "check-api: OK ($(grep -Eo '[0-9]+ generated, [0-9]+ passed' "$work/report.txt" | head -1))"
