#!/usr/bin/env bash
# Checks the files in systemd/ without a running systemd (CI: root in a container):
#  - `systemd-analyze verify` on millrace.service; ANY output is a failure, since it exits 0
#    on most warnings (unknown keys, bad values, ...). verify insists that the binaries in
#    Exec lines exist, so it runs on a copy whose /usr/local/bin/millrace points at
#    MILLRACE_BINARY (never executed; default target/debug/millrace, or a stand-in if that
#    is not built).
#  - millrace.sysusers and millrace.tmpfiles applied to a scratch root (not to this host).
# Installs Debian's systemd package first if systemd-analyze is missing.
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

echo "check-systemd: OK ($checked; $(systemd-analyze --version | head -n1))"
