#!/usr/bin/env bash
# Start a one-node Slurm on localhost: munge, MariaDB, slurmdbd, slurmctld, slurmd (Debian; needs root).
# Everything runtime lives under $SLURM_LOCAL_DIR (default /tmp/papertrain-slurm); down.sh stops it all.
# Prints the line to eval for clients:  eval "$(bash scripts/slurm-localhost/up.sh | tail -1)"
set -euo pipefail
D=${SLURM_LOCAL_DIR:-/tmp/papertrain-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
log() { echo "slurm-localhost: $*" >&2; }

# exit status 3: not root, 4: the packages cannot be installed (the tests skip, saying so); else 1
if [ "$(id -u)" != 0 ]; then log "needs root (the daemons run as root and munge)"; exit 3; fi
missing=""
for tool in slurmctld slurmd slurmdbd sbatch munged mariadbd; do command -v "$tool" >/dev/null || missing=1; done
if [ -n "$missing" ]; then
  log "installing Debian's slurmctld slurmd slurmdbd slurm-client munge mariadb-server"
  if ! { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         slurmctld slurmd slurmdbd slurm-client munge mariadb-server >&2; }; then
    log "could not install the Slurm packages (no Debian package mirror reachable?)"; exit 4
  fi
fi
mkdir -p "$D/munge" "$D/ctld" "$D/d" "$D/db"
chown munge:munge "$D/munge"; chmod 0755 "$D/munge"   # munged insists on this

# 1. munge: the credential service every Slurm daemon and client talks to
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! kill -0 "$(cat "$D/munge/munged.pid" 2>/dev/null)" 2>/dev/null; then
  runuser -u munge -- /usr/sbin/munged --socket="$D/munge/munge.socket.2" --key-file=/etc/munge/munge.key \
    --log-file="$D/munge/munged.log" --pid-file="$D/munge/munged.pid" --seed-file="$D/munge/munged.seed"
fi

# 2. MariaDB on 127.0.0.1:$DB_PORT with a database for slurmdbd
DB_PASSWORD=$(cat "$D/db.password" 2>/dev/null || head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$DB_PASSWORD" > "$D/db.password"; chmod 600 "$D/db.password"
if [ ! -d "$D/db/data/mysql" ]; then
  mariadb-install-db --user=root --datadir="$D/db/data" --auth-root-authentication-method=socket \
    --skip-test-db >"$D/db/install.log" 2>&1
fi
if ! kill -0 "$(cat "$D/db/mariadb.pid" 2>/dev/null)" 2>/dev/null; then
  mariadbd --user=root --datadir="$D/db/data" --socket="$D/db/mariadb.sock" --pid-file="$D/db/mariadb.pid" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$D/db/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
  for _ in $(seq 1 60); do [ -S "$D/db/mariadb.sock" ] && break; sleep 0.5; done
fi
mariadb --socket="$D/db/mariadb.sock" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# 3. the Slurm configs, filled in for this machine
HOST=$(hostname -s)
CPUS=$(getconf _NPROCESSORS_ONLN)  # not `nproc`: it reports OMP_NUM_THREADS when that is set
MEMORY_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
fill() {
  sed -e "s|@DIR@|$D|g" -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY_MB@|$MEMORY_MB|g" \
      -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASSWORD@|$DB_PASSWORD|g" "$HERE/$1" > "$D/$1"
}
fill slurm.conf
fill slurmdbd.conf
chmod 600 "$D/slurmdbd.conf"
export SLURM_CONF="$D/slurm.conf"

# 4. slurmdbd (reads slurmdbd.conf next to $SLURM_CONF), then the controller and the node daemon
if ! kill -0 "$(cat "$D/slurmdbd.pid" 2>/dev/null)" 2>/dev/null; then
  slurmdbd
  for _ in $(seq 1 60); do timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
fi
timeout 20 sacctmgr -i add cluster papertrain >/dev/null 2>&1 || true
if ! kill -0 "$(cat "$D/slurmctld.pid" 2>/dev/null)" 2>/dev/null; then slurmctld -i; fi
if ! kill -0 "$(cat "$D/slurmd.pid" 2>/dev/null)" 2>/dev/null; then slurmd; fi
for _ in $(seq 1 60); do timeout 5 sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 0.5; done
if ! timeout 5 sinfo -h -o %T 2>/dev/null | grep -q idle; then
  log "the node did not come up; see $D/slurmctld.log and $D/slurmd.log"; exit 1
fi
timeout 5 sinfo >&2
echo "export SLURM_CONF=$D/slurm.conf"
