#!/usr/bin/env bash
# Starts a real single-node Slurm cluster on this machine for the Slurm compute
# target's tests and demo: Debian's slurm-wlm (slurmctld + slurmd) with munge, no
# accounting storage (jobs are followed with `scontrol show job`). Detects rather
# than assumes: a cluster that already answers (`sinfo` shows an idle or mixed node
# whose slurmd runs) is used as it is; packages are installed only when missing;
# munged, slurmctld and slurmd are started only when not running; the slurm.conf is
# written only when there is none or it is the one this script wrote (then the
# daemons are restarted if it changed: running jobs go on).
# Root only (it starts daemons). Prints `MILLRACE_SLURM=ready` on stdout; the rest
# goes to stderr. Idempotent: a second run takes a few milliseconds and says nothing.
set -euo pipefail
say() { echo "setup-slurm: $*" >&2; }
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }

conf=/etc/slurm/slurm.conf
mark="# written by millrace scripts/setup-slurm.sh"
logs=(/var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log)

# Slurm's clients wait many seconds for a slurmctld that is not there: bound them.
q() { timeout 3 "$@" 2>/dev/null; }
# "NAME STATE" of the (first) node; STATE keeps its suffix (`idle*`: not responding).
# Ready: both daemons run (a dead slurmd shows `idle` for minutes) and the node is up.
node() { q sinfo -h -N -o '%N %t' | head -1 || true; }
ready() {
    local n
    pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null || return 1
    n=$(node)
    [[ "${n#* }" =~ ^(idle|mix|mixed|alloc|allocated|comp|completing)$ ]]
}
daemons() { pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; }
die() {
    say "error: $*"
    say "node: $(q sinfo -h -N -o '%N %t %E' || echo 'sinfo has no answer')"
    for f in "${logs[@]}"; do [[ -e "$f" ]] && { say "== tail $f"; tail -n 20 "$f" >&2; }; done
    exit 1
}

# slurm.conf: one node (this host) with its CPUs and memory (less 1 GiB), one
# default partition, no accounting storage, fast scheduling.
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
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
# Memory is allocated (a job without --mem gets its CPUs' share, not the whole node,
# so jobs still run side by side) and enforced without cgroups: slurmstepd polls the
# steps' RSS every second and kills a job past its --mem. Such a job ends FAILED
# (Reason=JobLaunchFailure, ExitCode=0:9, "Exceeded job memory limit" in its output),
# not OUT_OF_MEMORY, which only the cgroup plugins report.
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem_mib / cpus))
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=1
SchedulerType=sched/backfill
# Without these, sbatch to completion takes about 3 s instead of under 1 s.
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol for 5 minutes (no accounting storage).
MinJobAge=300
MailProg=/bin/true
# A job past its time limit ends at the limit: no grace minutes, SIGKILL 5 s after SIGTERM.
KillWait=5
OverTimeLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
ours() { grep -qxF "$mark" "$conf"; }
current() { [[ -e "$conf" ]] && { ! ours || [[ "$(<"$conf")" == "$want" ]]; }; }

# The fast path: a cluster that answers, with this script's slurm.conf as it is now.
if command -v sinfo >/dev/null && current && ready; then
    echo "MILLRACE_SLURM=ready"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "starting Slurm needs root (or point millrace at an existing cluster)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v pgrep >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get"
    say "installing slurm-wlm, munge and the Slurm client (Debian packages)"
    apt_get update -qq >&2
    # procps: pgrep, which tells whether the daemons run.
    apt_get install -y -qq --no-install-recommends slurm-wlm slurm-client munge procps >&2
fi

# munge: the key (the postinst makes one; an image that skipped it may not have it).
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key >&2
    elif command -v create-munge-key >/dev/null; then
        create-munge-key -f >&2
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged >&2
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

changed=0
if [[ ! -e "$conf" ]] || { ours && ! current; }; then
    say "writing $conf (node localhost: $cpus CPUs, $mem_mib MiB)"
    mkdir -p "$(dirname "$conf")"
    printf '%s\n' "$want" >"$conf"
    changed=1
elif ! ours; then
    say "using the existing $conf (not written by this script)"
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

# A changed slurm.conf needs both daemons restarted (reconfigure does not apply
# SelectType or node changes). Jobs that run go on: slurmstepd outlives slurmd.
stop_daemons() {
    say "restarting slurmctld and slurmd: $1"
    q scontrol shutdown >&2 || true
    for _ in $(seq 100); do daemons || break; sleep 0.1; done
    for pidfile in /run/slurmctld.pid /run/slurmd.pid; do
        if [[ -s "$pidfile" ]] && kill -0 "$(<"$pidfile")" 2>/dev/null; then
            kill "$(<"$pidfile")" 2>/dev/null || true
        fi
    done
    for _ in $(seq 100); do daemons || break; sleep 0.1; done
    ! daemons || die "slurmctld or slurmd does not stop"
}
start_daemons() {
    if ! pgrep -x slurmctld >/dev/null; then
        say "starting slurmctld"
        /usr/sbin/slurmctld >&2 || die "slurmctld does not start"
    fi
    if ! pgrep -x slurmd >/dev/null; then
        say "starting slurmd"
        /usr/sbin/slurmd -N localhost >&2 || die "slurmd does not start"
    fi
}
restarted=0
if ((changed)) && daemons; then
    stop_daemons "$conf changed"
    restarted=1
fi
start_daemons

# Wait (30 s at most) for an idle node; resume one left down or drained by an
# earlier run (ReturnToService=2 brings back only a node that was down for not
# responding).
deadline=$((SECONDS + 30))
resumed=0
until ready; do
    ((SECONDS < deadline)) || die "the node is not idle after 30 s"
    pgrep -x slurmctld >/dev/null || die "slurmctld stopped"
    pgrep -x slurmd >/dev/null || die "slurmd stopped"
    n=$(node)
    case "${n#* }" in
        inval)
            # Daemons started before this script last wrote the file read an older one.
            ((restarted)) || ! ours || { stop_daemons "the node is inval"; start_daemons; restarted=1; continue; }
            die "the node does not match its NodeName line in $conf" ;;
        down | drain | drained | drng | draining | fail | failg)
            ((resumed)) || say "resuming node ${n%% *} (${n#* })"
            resumed=1
            q scontrol update nodename="${n%% *}" state=resume >&2 || true ;;
    esac
    sleep 0.2
done
echo "MILLRACE_SLURM=ready"
