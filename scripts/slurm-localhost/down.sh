#!/usr/bin/env bash
# Stop what up.sh started (by pid file), in reverse order, and wait for each daemon to exit.
D=${SLURM_LOCAL_DIR:-/tmp/papertrain-slurm}
for f in "$D/slurmd.pid" "$D/slurmctld.pid" "$D/slurmdbd.pid" "$D/db/mariadb.pid" "$D/munge/munged.pid"; do
  pid=$(cat "$f" 2>/dev/null) || continue
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  echo "stopped $(basename "$f" .pid) ($pid)"
done
