#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (Debian/Ubuntu, run as root) for tests and local trials.
#
# Installs Debian's slurmctld/slurmd/slurm-client/munge if missing (apt-get, --no-install-recommends), writes
# /etc/slurm/slurm.conf for one node named after `hostname -s`, starts munged, slurmctld and slurmd (each forks and
# writes a pid file) and waits until the node is idle. Stop it with scripts/slurm/stop_cluster.sh (by pid).
#
# Usage: scripts/slurm/start_cluster.sh [--keep-state]
#   --keep-state   keep /var/spool/slurm* (old jobs, job ids); default: start from an empty state
# Env:
#   SLURM_LOCAL_CPUS   CPUs declared for the node (default: max(4, nproc); more than the hardware is allowed,
#                      SlurmdParameters=config_overrides keeps the node from draining over it)
# Exit status: 0 cluster up (first stdout line "started" or "already-running"); 2 cannot run here (not root,
# no apt-get, packages unavailable, an /etc/slurm/slurm.conf this script did not write); the reason is printed on
# stderr as "cannot start slurm: <reason>";
# 1 any other failure (daemon logs are in /var/log/slurm/).
set -euo pipefail

KEEP_STATE=0
for arg in "$@"; do
  case "$arg" in
    --keep-state) KEEP_STATE=1 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "start_cluster.sh: unknown argument '$arg' (expected --keep-state)" >&2; exit 1 ;;
  esac
done

cannot() { echo "cannot start slurm: $*" >&2; exit 2; }

NODE=$(hostname -s)
NCPU=$(nproc)
CPUS=${SLURM_LOCAL_CPUS:-$((NCPU > 4 ? NCPU : 4))}
CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
HEADER="# Written by cednet-pl scripts/slurm/start_cluster.sh"

# a daemon is up when its pid file names a live, non-zombie process (readable by any user, unlike kill -0)
alive() { [ -s "$1" ] && [ -d "/proc/$(cat "$1")" ] && ! grep -q '^State:.*Z' "/proc/$(cat "$1")/status" 2>/dev/null; }

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1; }

# never use or touch a real Slurm installation: only a conf written by this script counts
if [ -e "$CONF" ] && ! grep -q "^$HEADER" "$CONF"; then
  cannot "$CONF exists and was not written by scripts/slurm/start_cluster.sh (a real Slurm installation?); not touching it"
fi

if alive "$MUNGE_PID" && alive "$CTLD_PID" && alive "$SLURMD_PID"; then
  case "$(node_state)" in
    idle | mix | alloc | comp)
      echo "already-running"
      echo "pids: munged=$(cat "$MUNGE_PID") slurmctld=$(cat "$CTLD_PID") slurmd=$(cat "$SLURMD_PID")"
      exit 0
      ;;
  esac
fi

[ "$(id -u)" -eq 0 ] || cannot "must run as root to install and start slurmctld/slurmd/munged (uid $(id -u))"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || cannot "slurm is not installed and apt-get is not available"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || cannot "apt-get update failed (no network or no package mirror?)"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/tmp/slurm-apt.log 2>&1 \
    || cannot "apt-get install slurmctld slurmd slurm-client munge failed (see /tmp/slurm-apt.log)"
fi

if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
chown munge:munge /run/munge
chmod 755 /run/munge
chown slurm:slurm /var/spool/slurmctld /var/log/slurm

if [ "$KEEP_STATE" -eq 0 ] && ! alive "$CTLD_PID" && ! alive "$SLURMD_PID"; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
fi

# cred_expire=10 and sched/bf_interval=2 let a requeued job start again after ~12 s instead of minutes;
# more CPUs than the hardware (config_overrides) so that 2-4 task jobs and a test's second job can be scheduled.
cat >"$CONF" <<CONF
${HEADER}: one-node test cluster.
ClusterName=cednet-local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF

alive "$MUNGE_PID" || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null || { echo "munge self-test failed (munge -n | unmunge)" >&2; exit 1; }
alive "$CTLD_PID" || /usr/sbin/slurmctld
alive "$SLURMD_PID" || /usr/sbin/slurmd

state=""
for _ in $(seq 1 60); do
  state=$(node_state)
  case "$state" in idle | mix | alloc) break ;; esac
  sleep 0.5
done
case "$state" in
  idle | mix | alloc) ;;
  *)
    echo "slurm node $NODE did not become idle within 30 s (state '${state:-unknown}');" \
      "see /var/log/slurm/slurmctld.log and slurmd.log" >&2
    exit 1
    ;;
esac
echo "started"
echo "pids: munged=$(cat "$MUNGE_PID") slurmctld=$(cat "$CTLD_PID") slurmd=$(cat "$SLURMD_PID")"
echo "node: $NODE CPUs=$CPUS partition=debug"
