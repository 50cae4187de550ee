#!/usr/bin/env bash
# Makes a container engine that speaks the Docker Engine API available for
# `container` steps, their tests and the demo, and builds the registry-free test
# image localhost/millrace-busybox:1. Detects the host's situation instead of
# assuming it:
#  - an engine already answering at $DOCKER_HOST is used as it is;
#  - otherwise podman is installed (apt) when missing, and `podman system service`
#    is started on /run/podman/podman.sock (root) or $XDG_RUNTIME_DIR/podman/…;
#  - when the hard open-file or process limits are below what podman asks for and
#    cannot be raised, containers.conf gets default_ulimits at the real limits;
#  - on a cgroup v1 host whose v2 `unified` hierarchy holds only hugetlb, crun
#    refuses "hybrid mode": hugetlb is then mounted as a v1 hierarchy (root only;
#    a host change that lasts until reboot).
# Prints `DOCKER_HOST=…` on stdout; everything else goes to stderr. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="localhost/millrace-busybox:1"
say() { echo "setup-containers: $*" >&2; }

# GET /_ping on a socket URL; true when the engine answers OK.
ping_engine() {
    python3 - "$1" <<'PYEOF'
import socket, sys
url = sys.argv[1]
path = url[len("unix://"):] if url.startswith("unix://") else url
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    s.connect(path)
    s.sendall(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    sys.exit(0 if data.split(b"\r\n\r\n", 1)[-1].strip() == b"OK" else 1)
except OSError:
    sys.exit(1)
PYEOF
}

if [[ -n "${DOCKER_HOST:-}" ]] && ping_engine "$DOCKER_HOST"; then
    host="$DOCKER_HOST"
    have_podman=$(command -v podman || true)
else
    if ! command -v podman >/dev/null; then
        if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
            say "podman is missing; install it (apt-get install podman crun) or set DOCKER_HOST to a running Docker engine"
            exit 1
        fi
        say "installing podman"
        apt-get update -qq -o DPkg::Lock::Timeout=600
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
            --no-install-recommends podman crun busybox-static uidmap slirp4netns \
            fuse-overlayfs catatonit conmon golang-github-containers-common >&2
    fi
    have_podman=$(command -v podman)

    if [[ $(id -u) -eq 0 ]]; then
        # Limits: podman asks crun for nofile 1048576 and nproc as configured; a
        # VM without CAP_SYS_RESOURCE cannot go above its hard limits.
        # conmon runs with nproc 32768 on such hosts, whatever the shell's limit.
        nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
        [[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
        conf=/etc/containers/containers.conf
        if [[ "$nofile" != unlimited && "$nofile" -lt 1048576 ]] \
            && ! grep -qs '^[[:space:]]*default_ulimits' "$conf"; then
            say "hard limits nofile=$nofile nproc=$nproc: writing default_ulimits to $conf"
            mkdir -p /etc/containers
            if grep -qs '^\[containers\]' "$conf"; then
                sed -i "/^\[containers\]/a default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]  # millrace scripts/setup-containers.sh" "$conf"
            else
                printf '\n[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]  # millrace scripts/setup-containers.sh\n' \
                    "$nofile" "$nofile" "$nproc" "$nproc" >>"$conf"
            fi
        fi
        # Hybrid cgroups: v1 controllers plus a v2 hierarchy that holds hugetlb.
        unified=/sys/fs/cgroup/unified/cgroup.controllers
        if [[ -r $unified && "$(tr -d '[:space:]' <"$unified")" == hugetlb ]] \
            && ! grep -qs ' /sys/fs/cgroup/hugetlb cgroup ' /proc/mounts; then
            say "cgroup v2 holds only hugetlb (crun's hybrid mode): mounting hugetlb as a v1 hierarchy"
            mkdir -p /sys/fs/cgroup/hugetlb
            mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
        fi
        sock=/run/podman/podman.sock
    else
        sock="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/podman/podman.sock"
    fi
    host="unix://$sock"
    if ! ping_engine "$host"; then
        say "starting podman system service on $sock"
        mkdir -p "$(dirname "$sock")"
        log="$(dirname "$sock")/millrace-podman-service.log"
        setsid nohup podman system service --time=0 "$host" >"$log" 2>&1 </dev/null &
        for _ in $(seq 1 200); do
            ping_engine "$host" && break
            sleep 0.1
        done
        if ! ping_engine "$host"; then
            say "podman system service did not answer within 20 s:"
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
    fi
fi

# The test image: Debian's static busybox in an otherwise empty root, imported
# from a tarball (no registry is needed or reachable).
if [[ -n "$have_podman" ]] && ! podman image exists "$image" 2>/dev/null; then
    busybox=/bin/busybox
    if ! file_is_static=$(ldd "$busybox" 2>&1) || [[ "$file_is_static" != *"not a dynamic"* ]]; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
                --no-install-recommends busybox-static >&2
        fi
    fi
    say "building $image from $busybox"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp" "$work/rootfs/proc" \
        "$work/rootfs/sys" "$work/rootfs/dev"
    cp "$busybox" "$work/rootfs/bin/busybox"
    for applet in $("$busybox" --list); do
        [[ -e "$work/rootfs/bin/$applet" ]] || ln -s busybox "$work/rootfs/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' \
        >"$work/rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/rootfs/etc/group"
    chmod 1777 "$work/rootfs/tmp"
    tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
    podman import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' \
        "$work/rootfs.tar" "$image" >/dev/null
fi
# crun must really start a container here (limits, cgroups), not only import.
if [[ -n "$have_podman" ]] \
    && { ! out=$(podman run --rm --network=none "$image" sh -c 'echo ok' 2>&1) || [[ "$out" != ok ]]; }; then
    say "a test container does not start: $out"
    exit 1
fi
if ! python3 - "$host" "$image" <<'PYEOF'
import socket, sys, urllib.parse
path = sys.argv[1][len("unix://"):] if sys.argv[1].startswith("unix://") else sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(path)
s.sendall(f"GET /v1.41/images/{urllib.parse.quote(sys.argv[2], safe='')}/json HTTP/1.0\r\nHost: engine\r\n\r\n".encode())
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.exit(0 if data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200") else 1)
PYEOF
then
    say "the engine at $host does not have $image (build it there: see this script)"
    exit 1
fi
echo "DOCKER_HOST=$host"
