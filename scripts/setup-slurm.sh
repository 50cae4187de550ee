#!/usr/bin/env bash
# Starts a real single-node Slurm cluster on this machine for the Slurm compute
# target's tests and demo: Debian's slurm-wlm (slurmctld + slurmd) with munge, no
# accounting storage (jobs are followed with `scontrol show job`). Detects rather
# than assumes: a cluster that already answers (`sinfo` shows an idle or mixed node)
# is used as it is; packages are installed only when missing; the slurm.conf is
# written only when there is none or it is the one this script wrote.
# Root only (it starts daemons). Prints `MILLRACE_SLURM=ready` on stdout; the rest
# goes to stderr. Idempotent.
set -euo pipefail
say() { echo "setup-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }

node_state() { sinfo -h -N -o %t 2>/dev/null | head -1 | tr -d '*~#!%$@^-'; }
ready() { [[ "$(node_state)" =~ ^(idle|mix|mixed|alloc|allocated)$ ]]; }

if command -v sinfo >/dev/null && ready; then
    echo "MILLRACE_SLURM=ready"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "starting Slurm needs root (or point millrace at an existing cluster)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get"
    say "installing slurm-wlm, munge and the Slurm client (Debian packages)"
    apt_get update -qq >&2
    apt_get install -y -qq --no-install-recommends slurm-wlm slurm-client munge >&2
fi

# munge: the key (the postinst makes one; a minimal image may not have run it).
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key >&2
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# slurm.conf: one node (this host) with its CPUs and memory, one default partition.
conf=/etc/slurm/slurm.conf
mark="# written by millrace scripts/setup-slurm.sh"
cpus=$(nproc)
mem_mib=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024))
want=$(
    cat <<CONF
$mark
ClusterName=millrace
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Without these, sbatch to completion takes about 3 s instead of under 1 s.
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol for 5 minutes (no accounting storage).
MinJobAge=300
KillWait=5
OverTimeLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
changed=0
if [[ ! -e "$conf" ]] || { grep -qF "$mark" "$conf" && [[ "$(cat "$conf")" != "$want" ]]; }; then
    say "writing $conf (node localhost: $cpus CPUs, $mem_mib MiB)"
    mkdir -p /etc/slurm
    printf '%s\n' "$want" >"$conf"
    changed=1
elif ! grep -qF "$mark" "$conf"; then
    say "using the existing $conf (not written by this script)"
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

if ! pgrep -x slurmctld >/dev/null; then
    say "starting slurmctld"
    /usr/sbin/slurmctld
elif ((changed)); then
    scontrol reconfigure >&2 || true
fi
if ! pgrep -x slurmd >/dev/null; then
    say "starting slurmd"
    /usr/sbin/slurmd -N localhost
fi
for _ in $(seq 300); do
    ready && break
    case "$(node_state)" in
        down | drain | drained | draining | fail | inval)
            scontrol update nodename=localhost state=resume >&2 2>/dev/null || true ;;
    esac
    sleep 0.1
done
if ! ready; then
    say "the node is not idle after 30 s: $(sinfo -N 2>&1 | tail -1)"
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
fi
echo "MILLRACE_SLURM=ready"
