#!/usr/bin/env bash
# Install (Debian packages) and start a single-node SLURM cluster on this machine, to try
# `python train.py -m ... hydra/launcher=slurm` without a real cluster. Needs root. The node's CPUs
# and memory are read from the machine. Stop it with scripts/slurm/stop.sh.
#   bash scripts/slurm/start.sh && sinfo
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
state=/var/spool/conceptlab-slurm
mkdir -p /etc/slurm "$state/ctld" "$state/d" /var/log/slurm /run/munge /var/lib/munge /var/log/munge /etc/munge

# munge: a key, then the daemon (as root: --force).
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || munged --force </dev/null >/dev/null 2>&1

cat > /etc/slurm/slurm.conf <<CONF
# Written by conceptlab's scripts/slurm/start.sh: one node, no cgroups, no accounting.
ClusterName=conceptlab
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

pgrep -x slurmctld >/dev/null || slurmctld </dev/null >/dev/null 2>&1
pgrep -x slurmd >/dev/null || slurmd </dev/null >/dev/null 2>&1
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    sinfo
    exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/" >&2
exit 1
