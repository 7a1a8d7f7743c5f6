#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh: cancel all jobs, then
# stop slurmd (n1, n2) and slurmctld.  munged is left running on purpose: it
# is harmless and start_cluster.sh reuses it.  Safe to run when nothing runs.
set -uo pipefail

log() { echo "[stop_cluster] $*"; }

# Stop the process recorded in a pidfile, but only if it really is $2, so a
# stale pidfile never makes us kill an unrelated process.
stop_pidfile() {
    local pidfile=$1 comm=$2 pid st
    [[ -s $pidfile ]] || return 0
    pid="$(cat "$pidfile" 2>/dev/null)"
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$comm" ]]; then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $comm (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        # Gone, or a zombie (PID 1 here may be slow to reap): either way dead.
        st="$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ')"
        [[ -z $st || $st == Z* ]] && { rm -f "$pidfile"; return 0; }
        sleep 0.25
    done
    log "$comm (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

# Cancel jobs while the daemons are still up, so their processes are cleaned
# up by slurmstepd rather than orphaned when slurmd goes away.
if scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        # Jobs get SIGTERM, then SIGKILL after KillWait (10 s).
        for _ in $(seq 1 30); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 1
        done
    fi
fi

for n in n1 n2; do
    stop_pidfile "/run/slurmd-$n.pid" slurmd
done
stop_pidfile /run/slurmctld.pid slurmctld
log "stopped (munged left running)"
