#!/usr/bin/env bash
# Start a real, tiny Slurm cluster (controller + two compute nodes "n1" and
# "n2") on this single machine, for integration tests of the launcher.
#
# Idempotent: running it again leaves healthy daemons alone, starts the
# missing ones and restarts everything only if slurm.conf had to change.
# Must run as root (Debian bookworm, Slurm 22.05).  Stop with stop_cluster.sh.
#
# Environment knobs (all optional):
#   SLURM_TEST_WAIT_S   seconds to wait for the nodes to become idle (60)
#   SLURM_TEST_SKIP_VERIFY=1  skip the srun/sbatch smoke test at the end
set -euo pipefail

WAIT_S="${SLURM_TEST_WAIT_S:-60}"
HOST="$(hostname -s)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_ROOT=/var/spool/slurmd
NODES=(n1 n2)
declare -A NODE_PORT=([n1]=6818 [n2]=6819)

log() { echo "[start_cluster] $*"; }

show_logs() {
    local f
    for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-n1.log \
             "$LOG_DIR"/slurmd-n2.log /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "----- tail -n 30 $f -----" >&2
        tail -n 30 "$f" >&2 || true
    done
}

die() {
    echo "[start_cluster] ERROR: $*" >&2
    show_logs
    echo "[start_cluster] logs: $LOG_DIR/ and /var/log/munge/munged.log" >&2
    exit 1
}

# True if the pid in pidfile $1 is alive and is the program named $2, so a
# stale pidfile whose pid got reused by something else is not trusted.
pid_alive() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null)" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
    # PID 1 here may reap slowly: a dead daemon lingers as a zombie.
    [[ "$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ')" != Z* ]]
}

[[ $(id -u) -eq 0 ]] || { echo "[start_cluster] ERROR: must run as root" >&2; exit 1; }

# --------------------------------------------------------------------------
# 1. Packages
# --------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' \
        || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet; only then pay for update.
    if ! apt-get install -y "${missing[@]}" >/tmp/slurm-apt.log 2>&1; then
        log "apt-get install failed, retrying after apt-get update"
        apt-get update >>/tmp/slurm-apt.log 2>&1 || true
        apt-get install -y "${missing[@]}" >>/tmp/slurm-apt.log 2>&1 \
            || die "apt-get install failed, see /tmp/slurm-apt.log"
    fi
fi
# The packages' postinst cannot start services here (no systemd as PID 1,
# policy-rc.d denies), so everything below starts the daemons by hand.

# --------------------------------------------------------------------------
# 2. Name resolution
# --------------------------------------------------------------------------
# Slurm resolves node names when building hostlists and the launcher uses the
# first node's name as rendezvous address, so n1/n2 must resolve to loopback;
# our own hostname (SlurmctldHost / NodeHostname) must resolve at all.
if ! getent hosts "$HOST" >/dev/null; then
    log "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi
for name in "${NODES[@]}"; do
    if ! grep -Eq "^[[:space:]]*127\.0\.0\.1([[:space:]].*)?[[:space:]]$name([[:space:]]|$)" /etc/hosts; then
        log "adding $name to /etc/hosts"
        echo "127.0.0.1 $name" >>/etc/hosts
    fi
done

# --------------------------------------------------------------------------
# 3. munge (Slurm's authentication)
# --------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
# munged refuses to start if the key or its dirs are readable by others.
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge   # clients (slurm tools run by any user) need the socket
chmod 0700 /var/lib/munge /var/log/munge

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    # --force: a leftover socket/lock from a dead munged (e.g. after a
    # container restart) would otherwise make it refuse to start.
    runuser -u munge -- /usr/sbin/munged --force \
        || die "munged failed to start"
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
fi
munge -n | unmunge >/dev/null 2>&1 || die "munge -n | unmunge fails"
log "munge OK"

# --------------------------------------------------------------------------
# 4. slurm.conf
# --------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" \
         "$SPOOL_ROOT/n1" "$SPOOL_ROOT/n2"
new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by tests/slurm/start_cluster.sh -- a 2-node test cluster on one host.
ClusterName=testcluster
SlurmctldHost=${HOST}(127.0.0.1)
# Daemons and jobs run as root: nothing to set up for a dedicated user.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Step credentials' lifetime is also how long a requeued job must wait before
# it may start again (default 120 s); keep it short so requeue tests are fast.
AuthInfo=cred_expire=10
MpiDefault=none
# No cgroups here (and two slurmds share the host): track processes by
# parent/child and bind nothing.  Signals still reach every task.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Re-scan pending jobs every 2 s instead of 60/30 s: a requeued job (pending
# on BeginTime) would otherwise sit idle up to a minute.  Cheap on 2 nodes.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that went down (e.g. its slurmd was restarted) comes back by itself.
ReturnToService=2
# Needed for "scontrol requeue" / preemption tests.
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled/times out.
KillWait=10
# Do not kill jobs whose srun went away unexpectedly.
InactiveLimit=0
# Keep finished jobs visible to "scontrol show job" for 5 minutes.
MinJobAge=300
# No mail on this box; the default (/bin/mail) is missing and logs errors.
MailProg=/bin/true
SlurmctldPort=6817
StateSaveLocation=${STATE_DIR}
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
# %n = node name: each of the two slurmds on this host needs its own.
SlurmdSpoolDir=${SPOOL_ROOT}/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=${LOG_DIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n1 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=${NODE_PORT[n1]} CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=${NODE_PORT[n2]} CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    [[ -f $CONF ]] && log "slurm.conf changed; daemons will be restarted"
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
fi

# --------------------------------------------------------------------------
# 5. Daemons
# --------------------------------------------------------------------------
stop_pidfile() {  # pidfile comm
    local pidfile=$1 comm=$2 pid
    pid_alive "$pidfile" "$comm" || return 0
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        pid_alive "$pidfile" "$comm" || return 0
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
}

if ((conf_changed)); then
    for n in "${NODES[@]}"; do stop_pidfile "/run/slurmd-$n.pid" slurmd; done
    stop_pidfile /run/slurmctld.pid slurmctld
fi

if ! pid_alive /run/slurmctld.pid slurmctld; then
    log "starting slurmctld"
    # Keeps saved state (jobs survive a restart); slurmctld daemonizes itself.
    slurmctld || die "slurmctld failed to start"
fi
for _ in $(seq 1 40); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.5
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer scontrol ping"

for n in "${NODES[@]}"; do
    if ! pid_alive "/run/slurmd-$n.pid" slurmd; then
        log "starting slurmd -N $n (port ${NODE_PORT[$n]})"
        slurmd -N "$n" || die "slurmd -N $n failed to start"
    fi
done

# --------------------------------------------------------------------------
# 6. Wait for both nodes to be idle (or busy with jobs from an earlier run)
# --------------------------------------------------------------------------
log "waiting up to ${WAIT_S}s for n1,n2 to be ready"
deadline=$((SECONDS + WAIT_S))
resumed=0
while :; do
    states="$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u || true)"
    ready=0
    for n in "${NODES[@]}"; do
        st="$(awk -v n="$n" '$1==n {print $2}' <<<"$states")"
        case "$st" in
            idle|mix|alloc) ready=$((ready + 1)) ;;
            # Down/drained from an earlier crash or a config change: put it back.
            down*|drain*|drng*|fail*)
                if ((!resumed)) || ((SECONDS % 10 == 0)); then
                    scontrol update nodename="$n" state=resume 2>/dev/null || true
                fi ;;
        esac
    done
    ((ready == ${#NODES[@]})) && break
    resumed=1
    if ((SECONDS >= deadline)); then
        echo "sinfo:" >&2; sinfo -N -l >&2 || true
        die "nodes not idle after ${WAIT_S}s"
    fi
    sleep 1
done
log "nodes ready:"; sinfo -N -o '%N %P %t %c' | sed 's/^/    /'

# --------------------------------------------------------------------------
# 7. Smoke test: both a direct srun and a batch job spanning the two nodes
# --------------------------------------------------------------------------
if [[ ${SLURM_TEST_SKIP_VERIFY:-0} != 1 ]]; then
    out="$(timeout 60 srun -N2 -n2 hostname 2>&1)" || die "srun -N2 -n2 hostname failed: $out"
    [[ $(wc -l <<<"$out") -eq 2 ]] || die "srun -N2 -n2 hostname printed: $out"
    log "srun -N2 -n2 hostname OK"

    work="$(mktemp -d /tmp/slurm-smoke.XXXXXX)"
    cat >"$work/job.sh" <<'EOF'
#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
#SBATCH --time=2
srun bash -c 'echo "$SLURM_NODEID $SLURM_PROCID $(scontrol show hostnames $SLURM_JOB_NODELIST | head -1)"'
EOF
    # --wait blocks until the job ends and returns its exit code.
    timeout 120 sbatch --wait -D "$work" -o "$work/out.txt" "$work/job.sh" >/dev/null \
        || die "smoke batch job failed; output: $(cat "$work/out.txt" 2>/dev/null)"
    ids="$(awk '{print $1}' "$work/out.txt" | sort | tr '\n' ' ')"
    [[ $ids == "0 1 " ]] || die "batch job output unexpected: $(cat "$work/out.txt")"
    log "sbatch 2-node job OK:"; sed 's/^/    /' "$work/out.txt"
    rm -rf "$work"
fi

log "cluster is up. logs: $LOG_DIR/{slurmctld,slurmd-n1,slurmd-n2}.log," \
    "/var/log/munge/munged.log; config: $CONF"
