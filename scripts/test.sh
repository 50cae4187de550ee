#!/usr/bin/env bash
# Every test: set up (targets, plugins), then the plugins' unit tests, the daemon's
# unit tests and its one integration-test binary (real binary, wasmtime, SQLite).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
echo "== style: rustfmt and clippy (warnings are errors)"
cargo fmt --all --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "== container engine (podman's Docker API service, or \$DOCKER_HOST) and the test image"
export "$(scripts/setup-containers.sh)"
echo "== a single-node Slurm cluster (munge, slurmctld, slurmd)"
scripts/setup-slurm.sh >/dev/null
echo "== plugin unit tests"
(cd plugins && cargo test --quiet --target x86_64-unknown-linux-gnu -p csvkit)
echo "== millrace tests"
# promtool checks the daemon's /metrics and docs/alerts.yml (Debian's prometheus package); zsh and fish
# parse the generated completions, man renders the manual page, script(1) gives the
# colour test a terminal.
want=()
command -v promtool >/dev/null || want+=(prometheus)
command -v zsh >/dev/null || want+=(zsh)
command -v fish >/dev/null || want+=(fish)
command -v man >/dev/null || want+=(man-db)
command -v script >/dev/null || want+=(bsdutils)
if ((${#want[@]})) && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
if command -v promtool >/dev/null; then
    export MILLRACE_REQUIRE_PROMTOOL=1
    # The sample alert rules, and that they fire on the series the daemon
    # exports (the tests check a real daemon's /metrics with `promtool check
    # metrics`, and these rules again).
    promtool check rules docs/alerts.yml
    promtool test rules docs/alerts.test.yml
fi
cargo test --workspace
MILLRACE_FUZZ_SECS=60 cargo test -p millrace --test integration fuzz:: -- --nocapture
echo "== example pipelines and configs against docs/schema/ (taplo)"
scripts/check-schema.sh
echo "== REST API against its OpenAPI document (schemathesis)"
scripts/check-api.sh
echo "== web UI in headless Chromium (playwright-core)"
scripts/check-ui.sh
echo "== systemd unit"
scripts/check-systemd.sh
echo "== the tree is as the tests found it"
# Tests and scripts write only under ignored paths; a tracked empty file is a stray
# shell redirect, or conmon's `oom` file from a service started in the checkout.
if ! git rev-parse --git-dir >/dev/null 2>&1; then
    echo "test.sh: not a git checkout; the clean-tree check is skipped"
    exit 0
fi
dirty="$(git status --porcelain --untracked-files=all)"
if [[ -n "$dirty" ]]; then
    echo "test.sh: the run left the work tree dirty:" >&2
    echo "$dirty" >&2
    exit 1
fi
empty=()
while IFS= read -r -d '' f; do
    if [[ -f "$f" && ! -s "$f" ]]; then empty+=("$f"); fi
done < <(git ls-files -z)
if ((${#empty[@]})); then
    echo "test.sh: tracked zero-byte files (stray redirects?): ${empty[*]}" >&2
    exit 1
fi
