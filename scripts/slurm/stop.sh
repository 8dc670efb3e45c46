#!/usr/bin/env bash
# Stop the single-node SLURM cluster that scripts/slurm/start.sh started.
scontrol shutdown >/dev/null 2>&1 || true
pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
pkill -x munged 2>/dev/null || true
sleep 2
pkill -9 -x slurmd 2>/dev/null || true
pkill -9 -x slurmctld 2>/dev/null || true
exit 0
