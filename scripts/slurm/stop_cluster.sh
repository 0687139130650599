#!/usr/bin/env bash
# Stop the one-node Slurm cluster started by scripts/slurm/start_cluster.sh, by the daemons' pid files
# (never by process name). Waits up to 15 s for each daemon to exit.
#
# Refuses (exit 2) when /etc/slurm/slurm.conf was not written by start_cluster.sh: a real installation's daemons
# are never stopped.
#
# Usage: scripts/slurm/stop_cluster.sh [--purge]
#   --purge   also wipe /var/spool/slurmctld and /var/spool/slurmd (forget jobs; job ids restart at 1)
set -uo pipefail

PURGE=0
for arg in "$@"; do
  case "$arg" in
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "stop_cluster.sh: unknown argument '$arg' (expected --purge)" >&2; exit 1 ;;
  esac
done

CONF=/etc/slurm/slurm.conf
if [ -e "$CONF" ] && ! grep -q "^# Written by cednet-pl scripts/slurm/start_cluster.sh" "$CONF"; then
  echo "stop_cluster.sh: $CONF was not written by scripts/slurm/start_cluster.sh; not stopping a real Slurm" >&2
  exit 2
fi

# A process counts as gone once it no longer exists or is a zombie (PID 1 may reap exited daemons late).
running() { [ -d "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

rc=0
for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  if running "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      running "$pid" || break
      sleep 0.5
    done
    if running "$pid"; then
      echo "stop_cluster.sh: pid $pid (from $f) still running after 15 s" >&2
      rc=1
      continue
    fi
    echo "stopped $(basename "$f" .pid) (pid $pid)"
  fi
  rm -f "$f"
done
if [ "$PURGE" -eq 1 ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
fi
exit $rc
