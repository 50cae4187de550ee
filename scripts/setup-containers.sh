#!/usr/bin/env bash
# Makes a container engine that speaks the Docker Engine API available for
# `container` steps, their tests and the demo, and builds the registry-free test
# image localhost/millrace-busybox:1. Detects the host's situation instead of
# assuming it:
#  - an engine already answering at $DOCKER_HOST is used as it is;
#  - otherwise podman is installed (apt, as root) when missing, and
#    `podman system service` is started on /run/podman/podman.sock (root) or
#    $XDG_RUNTIME_DIR/podman/podman.sock (other users) unless it already answers;
#  - when the open-file or process limits are below what rootful podman asks crun
#    for (1048576) and cannot be raised (no CAP_SYS_RESOURCE),
#    /etc/containers/containers.conf gets default_ulimits at the limits that podman
#    itself runs with (the hard nofile; nproc 32768 or a lower hard limit);
#  - on a cgroup v1 host whose v2 `unified` hierarchy still holds controllers
#    (crun: "cgroups in hybrid mode not supported"), those controllers are mounted
#    as v1 hierarchies (root only; lasts until reboot);
#  - the test image is Debian's static busybox in an otherwise empty root,
#    imported from a tarball: no registry is needed or reachable.
# Prints one line `DOCKER_HOST=…` on stdout (eval/export it); everything else goes
# to stderr. Idempotent: a second run only checks (well under a second).
# --verify: also start a test container even when nothing had to be set up.
set -euo pipefail

image="localhost/millrace-busybox:1"
verify=0
[[ "${1:-}" == --verify ]] && verify=1
say() { echo "setup-containers: $*" >&2; }
die() { say "error: $*"; exit 1; }
is_root() { [[ $(id -u) -eq 0 ]]; }
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }

# api URL METHOD PATH [BODYFILE CONTENT-TYPE]: one Docker Engine API call on a
# unix:// or tcp:// engine URL; prints the body, fails on no answer or non-2xx.
api() {
    local url=$1 method=$2 path=$3 body=${4:-} ctype=${5:-application/json}
    if command -v curl >/dev/null; then
        local args=(-sS --fail-with-body --max-time 60 -X "$method")
        [[ -n "$body" ]] && args+=(-H "Content-Type: $ctype" --data-binary "@$body")
        case "$url" in
            unix://*) curl "${args[@]}" --unix-socket "${url#unix://}" "http://d$path" ;;
            tcp://*) curl "${args[@]}" "http://${url#tcp://}$path" ;;
            *) return 2 ;;
        esac
    else
        python3 - "$url" "$method" "$path" "$body" "$ctype" <<'PYEOF'
import http.client, socket, sys
url, method, path, body, ctype = sys.argv[1:6]
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(url[len("unix://"):])
try:
    if url.startswith("unix://"):
        c = Unix("d", timeout=60)
    elif url.startswith("tcp://"):
        c = http.client.HTTPConnection(url[len("tcp://"):], timeout=60)
    else:
        sys.exit(2)
    data = open(body, "rb").read() if body else None
    c.request(method, path, body=data, headers={"Content-Type": ctype} if data else {})
    r = c.getresponse()
    sys.stdout.buffer.write(r.read())
    sys.exit(0 if 200 <= r.status < 300 else 1)
except OSError:
    sys.exit(1)
PYEOF
    fi
}
ping_engine() { [[ "$(api "$1" GET /_ping 2>/dev/null)" == OK ]]; }
image_present() { api "$1" GET "/v1.41/images/$image/json" >/dev/null 2>&1; }

# A container through the API, as millrace starts them: create, start, wait, logs.
api_run_check() {
    local url=$1 spec id out status
    spec=$(mktemp)
    printf '{"Image":"%s","Cmd":["sh","-c","echo ok"],"NetworkDisabled":true,"HostConfig":{"NetworkMode":"none","Memory":67108864,"MemorySwap":67108864,"PidsLimit":64,"CapDrop":["ALL"],"SecurityOpt":["no-new-privileges"]}}' \
        "$image" >"$spec"
    id=$(api "$url" POST /v1.41/containers/create "$spec" | sed -n 's/.*"Id" *: *"\([0-9a-f]*\)".*/\1/p') || true
    rm -f "$spec"
    [[ -n "$id" ]] || { say "the engine did not create a test container"; return 1; }
    status=0
    out=$(api "$url" POST "/v1.41/containers/$id/start" 2>&1) || { say "test container: $out"; status=1; }
    if ((status == 0)); then
        out=$(api "$url" POST "/v1.41/containers/$id/wait") || status=$?
        [[ "$out" == *'"StatusCode":0'* ]] || { say "test container: $out"; status=1; }
        out=$(api "$url" GET "/v1.41/containers/$id/logs?stdout=1&stderr=1" | tr -d '\0') || true
        [[ "$out" == *ok* ]] || { say "test container printed: $out"; status=1; }
    fi
    api "$url" DELETE "/v1.41/containers/$id?force=1" >/dev/null 2>&1 || true
    return "$status"
}

changed=0       # something was set up: verify by really starting containers
conf_changed=0  # containers.conf changed: a running service must restart

# 1. The engine: $DOCKER_HOST when it answers, else podman's service.
if [[ -n "${DOCKER_HOST:-}" ]] && ping_engine "$DOCKER_HOST"; then
    host="$DOCKER_HOST"
    own_podman=0
else
    [[ -n "${DOCKER_HOST:-}" ]] && say "DOCKER_HOST=$DOCKER_HOST does not answer: using podman"
    own_podman=1
    if ! command -v podman >/dev/null; then
        if ! is_root || ! command -v apt-get >/dev/null; then
            die "podman is not installed and cannot be installed from here (not root, or no apt-get): install podman, crun and busybox-static as root, or set DOCKER_HOST to a running engine"
        fi
        say "installing podman (Debian packages)"
        # podman pulls conmon, containers-common and (first alternative) crun; the
        # network stack for "bridge" is named: CNI's plugins (with iptables), as apt
        # picks them anyway. Only rootless podman needs uidmap, slirp4netns and
        # fuse-overlayfs, and only --init needs catatonit: not installed.
        pkgs=(podman crun conmon golang-github-containers-common containernetworking-plugins busybox-static)
        command -v curl >/dev/null || command -v python3 >/dev/null || pkgs+=(curl)
        apt_get update -qq >&2
        apt_get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
        changed=1
    fi

    if is_root; then
        # 2. Limits. Rootful podman asks crun for nofile and nproc 1048576; without
        # CAP_SYS_RESOURCE crun cannot go above its own hard limits ("setrlimit
        # RLIMIT_NOFILE: Operation not permitted"), so containers.conf names them.
        # podman (4.3) raises its own nofile to 1048576 or else the hard limit, and
        # sets its own nproc to 32768 (lowering it; when the hard limit is below,
        # that fails and the hard limit stays): conmon and crun inherit these.
        capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
        nofile=$(ulimit -Hn) nproc=$(ulimit -Hu) want=1048576
        [[ $nofile == unlimited || $nofile -gt $want ]] && nofile=$want
        [[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
        conf=/etc/containers/containers.conf
        mark="# millrace scripts/setup-containers.sh"
        line="default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]  $mark"
        if ((((0x${capeff:-0} >> 24) & 1) == 0)) && ((nofile < want || nproc < want)); then
            current=$(grep -s '^[[:space:]]*default_ulimits' "$conf" || true)
            if [[ -z "$current" ]]; then
                say "no CAP_SYS_RESOURCE, limits nofile=$nofile nproc=$nproc: default_ulimits in $conf"
                mkdir -p /etc/containers
                if grep -qs '^[[:space:]]*\[containers\]' "$conf"; then
                    sed -i "0,/^[[:space:]]*\[containers\]/s||&\n$line|" "$conf"
                else
                    { [[ -s "$conf" ]] && echo; printf '[containers]\n%s\n' "$line"; } >>"$conf"
                fi
                conf_changed=1 changed=1
            elif [[ "$current" == *"$mark"* && "$current" != "$line" ]]; then
                say "limits are now nofile=$nofile nproc=$nproc: updating default_ulimits in $conf"
                sed -i "s|^[[:space:]]*default_ulimits.*$mark.*|$line|" "$conf"
                conf_changed=1 changed=1
            elif [[ "$current" != *"$mark"* && ! ( "$current" == *nofile=* && "$current" == *nproc=* ) ]]; then
                # Someone else's default_ulimits: theirs to keep, but say what fails.
                say "warning: $conf has default_ulimits without both nofile and nproc (crun may fail: setrlimit ... Operation not permitted)"
            fi
        fi

        # 3. Hybrid cgroups: v1 hierarchies plus a v2 `unified` one that still holds
        # controllers (here hugetlb) make crun refuse to run. Mounting each such
        # controller as a v1 hierarchy takes it off v2.
        if [[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]] \
            && [[ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" == cgroup2fs ]]; then
            for ctl in $(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null); do
                mountpoint -q "/sys/fs/cgroup/$ctl" && continue
                say "cgroup v2 'unified' holds $ctl (crun: hybrid mode not supported): mounting it as v1 at /sys/fs/cgroup/$ctl"
                mkdir -p "/sys/fs/cgroup/$ctl"
                mount -t cgroup -o "$ctl" cgroup "/sys/fs/cgroup/$ctl" \
                    || die "cannot mount the $ctl cgroup controller as v1"
                changed=1
            done
            left=$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null || true)
            [[ -z "${left//[[:space:]]/}" ]] \
                || die "cgroup v2 'unified' still holds '$left': crun will refuse hybrid mode"
        fi
        sock=/run/podman/podman.sock
    else
        sock="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/podman/podman.sock"
    fi

    # 4. The service; one started by this script (same command line) may be
    # restarted, any other one is only used.
    host="unix://$sock"
    dir=$(dirname "$sock")
    log="$dir/millrace-service.log"
    service_pid() {
        local f args
        for f in /proc/[0-9]*/cmdline; do
            mapfile -d '' args <"$f" 2>/dev/null || continue
            [[ "${args[*]}" == "podman system service --time=0 $host" ]] || continue
            f=${f#/proc/}
            echo "${f%/cmdline}"
            return 0
        done
        return 1
    }
    if ((conf_changed)) && ping_engine "$host"; then
        if pid=$(service_pid); then
            say "restarting podman system service (pid $pid) for the new $conf"
            kill "$pid"
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null && sleep 0.2 || true
        else
            say "warning: restart the podman service on $sock to apply $conf"
        fi
    fi
    if ! ping_engine "$host"; then
        if ! service_pid >/dev/null; then
            say "starting podman system service on $sock (log: $log)"
            mkdir -p "$dir"
            rm -f "$sock"  # a stale socket from a service that is gone
            # In its own directory: conmon writes a file named `oom` into its
            # working directory when a container is OOM-killed, and it inherits
            # the service's (the checkout's, when started from here).
            (cd "$dir" && exec setsid nohup podman system service --time=0 "$host" >"$log" 2>&1 </dev/null) &
            changed=1
        fi
        for _ in $(seq 1 200); do
            ping_engine "$host" && break
            sleep 0.1
        done
        if ! ping_engine "$host"; then
            say "podman system service does not answer on $sock after 20 s; $log ends:"
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
    fi
fi

# 5. The test image, without a registry.
if ! image_present "$host"; then
    busybox=/bin/busybox
    # The rootfs has no libc: busybox must be the static build.
    is_static() { [[ -x "$busybox" && "$(LC_ALL=C ldd "$busybox" 2>&1 || true)" =~ not\ a\ dynamic|statically\ linked ]]; }
    if ! is_static; then
        if is_root && command -v apt-get >/dev/null; then
            say "installing busybox-static"
            apt_get install -y -qq --no-install-recommends busybox-static >&2
        fi
        is_static || die "$busybox is missing or not static: install busybox-static"
    fi
    say "building $image from Debian's $busybox"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    rootfs="$work/rootfs"
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev}
    cp "$busybox" "$rootfs/bin/busybox"
    # `--list-full` names each applet's usual place (bin/sh, usr/bin/head, ...).
    for applet in $("$busybox" --list-full); do
        [[ $applet == */* && ! -e "$rootfs/$applet" ]] || continue  # not linuxrc
        ln -s /bin/busybox "$rootfs/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    chmod 1777 "$rootfs/tmp"
    chmod 700 "$rootfs/root"
    tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$work/rootfs.tar" .
    path_env="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if ((own_podman)); then
        podman import --quiet --change 'CMD ["/bin/sh"]' --change "ENV $path_env" \
            "$work/rootfs.tar" "$image" >/dev/null
    else
        # Another engine ($DOCKER_HOST): the API's import (POST /images/create?fromSrc=-);
        # `repo` carries the tag as well (podman 4.3 ignores a separate `tag`).
        changes="changes=CMD%20%5B%22%2Fbin%2Fsh%22%5D&changes=ENV%20${path_env//\//%2F}"
        api "$host" POST "/v1.41/images/create?fromSrc=-&repo=$image&$changes" \
            "$work/rootfs.tar" application/x-tar >/dev/null \
            || die "the engine at $host did not import $image"
    fi
    image_present "$host" || die "the engine at $host does not show $image after the import"
    changed=1
fi

# A real start (crun, limits, cgroups) after anything was set up, or on --verify.
if ((changed || verify)); then
    if ((own_podman)); then
        out=$(podman run --rm --pull=never --network=none "$image" sh -c 'echo ok' 2>&1) \
            && [[ "$out" == ok ]] || die "podman run $image fails: $out"
    fi
    api_run_check "$host" || die "a test container does not run through the API at $host"
    say "ready: $image runs through $host"
fi
echo "DOCKER_HOST=$host"
