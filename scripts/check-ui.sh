#!/usr/bin/env bash
# The web UI in a real browser: Debian's chromium driven headless by playwright-core
# (npm), against a daemon with real runs. Screenshots: target/tmp/ui-screenshots/.
#   scripts/check-ui.sh [MILLRACE_BINARY]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="${1:-$target/debug/millrace}"
if ! command -v chromium >/dev/null; then
    echo "check-ui: installing chromium" >&2
    sudo_=""; [[ $(id -u) -eq 0 ]] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v npm >/dev/null; then
    sudo_=""; [[ $(id -u) -eq 0 ]] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
node_dir="$target/tmp/ui-node"
if [[ ! -d "$node_dir/node_modules/playwright-core" ]]; then
    mkdir -p "$node_dir"
    (cd "$node_dir" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)
fi
work="$(mktemp -d)"
pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/pipelines"
printf 'x,y\n1,2\n' >"$work/pipelines/data.csv"
cat >"$work/millrace.toml" <<TOML
pipelines = "pipelines"
state_dir = "state"
[api]
listen = "127.0.0.1:0"
TOML
cat >"$work/pipelines/ui-chain.toml" <<TOML
description = "A chain for the UI check"
[params]
secs = 1
[inputs.data]
path = "data.csv"
[[trigger]]
cron = "0 3 * * *"
timezone = "Europe/Stockholm"
[[step]]
name = "copy"
wasm = "$root/plugins/dist/copy.wasm"
inputs = { x = "inputs.data" }
outputs = ["out"]
[[step]]
name = "nap"
wasm = "$root/plugins/dist/sleep.wasm"
args = ["--secs", "\${params.secs}"]
inputs = { x = "copy.out" }
reuse = false
[[step]]
name = "done"
wasm = "$root/plugins/dist/noop.wasm"
after = ["nap"]
[[step]]
name = "score"
python = "score.py"
reuse = false
[[step]]
name = "render"
container = { image = "localhost/millrace-busybox:1", command = ["sh", "-c", "echo rendered"] }
after = ["done"]
reuse = false
TOML
cat >"$work/pipelines/score.py" <<PY
import json, os, random
with open(os.environ["MILLRACE_METRICS"], "a") as f:
    f.write(json.dumps({"name": "auc", "value": random.random()}) + "\\n")
PY
# The Python runtime compiled by setup.sh.
MILLRACE_CACHE="$target/tmp/millrace-cache" "$bin" daemon --config "$work/millrace.toml" 2>"$work/daemon.log" &
pid=$!
for _ in $(seq 100); do [[ -s "$work/state/daemon.json" ]] && break; sleep 0.1; done
url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$work/state/daemon.json")
"$bin" trigger ui-chain --config "$work/millrace.toml" --wait >/dev/null
shots="$target/tmp/ui-screenshots"
mkdir -p "$shots"
# Beside its node_modules, so the import of playwright-core resolves.
cp "$root/daemon/tests/browser/ui.mjs" "$node_dir/ui.mjs"
URL="$url" TOKEN="$(cat "$work/state/api-token")" SCREENSHOTS="$shots" node "$node_dir/ui.mjs"
