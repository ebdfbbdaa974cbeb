#!/usr/bin/env bash
# A real single-node Slurm on this machine, for trying `llip-launch launcher.kind=slurm` and for the
# tests marked `slurm`: munged, MariaDB + slurmdbd (so `sacct` reports job states), slurmctld and
# slurmd, started by hand (no systemd, no cgroups) with every file under one folder.
#
#   tools/slurm_local.sh start [--user-signal]   install Debian's packages if absent, then start
#                                                (idempotent; --user-signal switches preemption to
#                                                send the job's --signal, e.g. USR2, instead of TERM)
#   tools/slurm_local.sh stop                    stop every daemon by its PID file
#   tools/slurm_local.sh status                  one line per daemon; exit 1 unless all run
#   tools/slurm_local.sh env                     the `export SLURM_CONF=...` line for the clients
#
# Needs root (as on CI machines and containers). The folder is $LLIP_SLURM_DIR (default
# /var/tmp/llip-slurm). Two partitions share the one node: `debug` (default, preemptible: jobs are
# requeued) and `urgent` (higher priority: a job there preempts `debug` jobs).
set -euo pipefail

DIR=${LLIP_SLURM_DIR:-/var/tmp/llip-slurm}
CONF=$DIR/etc/slurm.conf
PORT_BASE=${LLIP_SLURM_PORT_BASE:-16817}  # slurmctld, slurmd, slurmdbd, mariadb: 4 ports from here
GRACE_S=${LLIP_SLURM_GRACE_S:-300}        # TERM -> KILL on preemption and requeue: room for a save
export SLURM_CONF=$CONF

die() { echo "slurm_local: $*" >&2; exit 1; }
log() { echo "slurm_local: $*"; }

require_root() {
  [ "$(id -u)" = 0 ] || die "needs root to run munged, slurmctld and slurmd (run it as root, e.g. with sudo)"
}

install_packages() {
  local missing=()
  for cmd in munged slurmctld slurmd slurmdbd mariadbd sbatch; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install slurm-wlm, slurmdbd, munge and mariadb-server"
  log "installing slurm-wlm, slurmdbd, munge, mariadb-server (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q slurm-wlm slurmdbd munge mariadb-server ||
    { apt-get update -q && apt-get install -y -q slurm-wlm slurmdbd munge mariadb-server; }; } \
    >"$DIR/log/install.log" 2>&1 || die "package install failed; see $DIR/log/install.log"
}

running() {  # running NAME: the daemon's PID file names a live process (not a zombie)
  local pid state
  pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$state" ] && [ "$state" != Z ]
}

wait_for() {  # wait_for WHAT CMD...: poll CMD until it succeeds; give up after 120 s
  local what=$1; shift
  for _ in $(seq 1 600); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up; see the logs in $DIR/log"
}

write_slurm_conf() {
  local user_signal=$1 node host params=""
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=... as this machine has them
  host=$(hostname -s)
  [ "$user_signal" = 1 ] && params="SlurmctldParameters=preempt_send_user_signal"
  cat >"$CONF.tmp" <<EOF
# Written by tools/slurm_local.sh; rewritten on each start.
ClusterName=llip-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible cred_expire + 1 s after it stopped (121 s by default).
AuthInfo=cred_expire=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# Logs each signal delivered to a job step ("Sent signal 12 to StepId=7.0").
SlurmdDebug=debug
# No cgroups and no systemd here: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=10,bf_interval=10
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=$GRACE_S
MinJobAge=3600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT_BASE + 2))
AccountingStoragePass=/run/munge/munge.socket.2
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$params
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  mv "$CONF.tmp" "$CONF"
}

write_slurmdbd_conf() {
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Written by tools/slurm_local.sh.
AuthType=auth/munge
AuthInfo=socket=/run/munge/munge.socket.2
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT_BASE + 3))
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a config others can read
}

start_munge() {
  running munged && return 0
  # munged wants its socket folder 0755 and its key private to the munge user.
  install -d -m 0755 -o munge -g munge /run/munge
  install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid --force
  wait_for munged test -s /run/munge/munged.pid
  ln -sf /run/munge/munged.pid "$DIR/run/munged.pid"
  wait_for munged sh -c 'munge -n | unmunge'
}

start_mariadb() {
  running mariadb && return 0
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=normal \
      >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
  fi
  # Only this machine reaches it (127.0.0.1); root without a password is slurmdbd's user.
  mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" \
    --bind-address=127.0.0.1 --port=$((PORT_BASE + 3)) --pid-file="$DIR/run/mariadb.pid" \
    --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  wait_for mariadb mariadb --no-defaults --socket="$DIR/run/mysql.sock" -uroot -e "select 1"
}

start_slurmdbd() {
  running slurmdbd && return 0
  slurmdbd
  wait_for slurmdbd sacctmgr -i show cluster
}

start_slurm() {
  if running slurmctld; then
    scontrol reconfigure >/dev/null  # picks up a changed slurm.conf (e.g. --user-signal)
  else
    slurmctld -c  # a fresh start forgets the jobs of an earlier one
  fi
  wait_for slurmctld scontrol ping
  running slurmd || slurmd
  wait_for "the node" sh -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
  wait_for "accounting" sacct -n -X -S now
}

cmd_start() {
  local user_signal=0
  [ "${1:-}" = "--user-signal" ] && user_signal=1
  require_root
  mkdir -p "$DIR"/{etc,log,run,state,spool}
  install_packages
  write_slurm_conf "$user_signal"
  write_slurmdbd_conf
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  log "running (preemption sends $([ "$user_signal" = 1 ] && echo "the job's --signal" || echo TERM)); clients need: export SLURM_CONF=$CONF"
}

stop_one() {  # stop_one NAME: TERM, wait up to 60 s, then KILL
  local pid
  pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$DIR/run/$1.pid"
}

cmd_stop() {
  for name in slurmd slurmctld slurmdbd mariadb munged; do stop_one "$name"; done
  log "stopped"
}

cmd_status() {
  local ok=0
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    if running "$name"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"; else echo "$name: stopped"; ok=1; fi
  done
  return $ok
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: tools/slurm_local.sh start [--user-signal] | stop | status | env" ;;
esac
