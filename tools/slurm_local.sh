#!/usr/bin/env bash
# A real Slurm on this machine, for trying `llip-launch launcher.kind=slurm` and for the tests
# marked `slurm`: munged, MariaDB + slurmdbd (so `sacct` reports job states), slurmctld and one or
# more slurmd, started by hand (no systemd, no cgroups) with every file under one folder.
#
#   tools/slurm_local.sh start [--nodes N] [--user-signal]
#                                  install Debian's packages if absent, then start (idempotent;
#                                  --user-signal switches preemption to send the job's --signal,
#                                  e.g. USR2, instead of TERM)
#   tools/slurm_local.sh stop      stop every daemon this instance started, remove its namespaces,
#                                  links and /etc/hosts entries
#   tools/slurm_local.sh status    one line per daemon and per node; exit 1 unless all run
#   tools/slurm_local.sh env       the `export SLURM_CONF=...` line for the clients
#
# Needs root (as on CI machines and containers). The folder is $LLIP_SLURM_DIR (default
# /var/tmp/llip-slurm), the ports start at $LLIP_SLURM_PORT_BASE (default 16817). Two partitions
# share the nodes: `debug` (default, preemptible: jobs are requeued) and `urgent` (higher
# priority: a job there preempts `debug` jobs).
#
# One node (the default) is this machine itself. With --nodes N > 1 each node nodeK is a slurmd in
# its own network and UTS namespace (hostname nodeK) with one address on a private /24
# ($LLIP_SLURM_SUBNET) reached through a veth pair on a bridge the script creates; slurmctld
# listens on the bridge's address in the root namespace. The namespaces have no default route and
# nothing is forwarded or NATed: traffic stays between them. Job tasks are forked by their node's
# slurmd and so run inside its namespaces; the file system, the process table and munged (a unix
# socket) are shared. /etc/hosts gets one line per node, removed again by `stop`.
set -euo pipefail

DIR=${LLIP_SLURM_DIR:-/var/tmp/llip-slurm}
CONF=$DIR/etc/slurm.conf
PORT_BASE=${LLIP_SLURM_PORT_BASE:-16817}  # slurmctld, slurmd, slurmdbd, mariadb: 4 ports from here
GRACE_S=${LLIP_SLURM_GRACE_S:-300}        # TERM -> KILL on preemption and requeue: room for a save
# Multi-node: nodeK is 10.251.P.(10+K), the bridge (slurmctld) 10.251.P.1, P from the port base.
SUBNET=${LLIP_SLURM_SUBNET:-10.251.$((PORT_BASE % 256))}  # the first three octets of a /24
TAG=llip$PORT_BASE                        # prefix of the bridge, veth and namespace names
BRIDGE=${TAG}br
HOSTS_MARK="# llip-slurm $DIR"            # ends each /etc/hosts line this instance adds
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

node_lines() {  # the NodeName lines and the partitions' node list of an N-node instance
  local nodes=$1 hw k
  hw=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')  # CPUs=... RealMemory=... of this machine
  for k in $(seq 1 "$nodes"); do
    echo "NodeName=node$k NodeAddr=$SUBNET.$((10 + k)) NodeHostname=node$k $hw State=UNKNOWN"
  done
}

write_slurm_conf() {
  local user_signal=$1 nodes=$2 node host params="" ctld_addr=127.0.0.1 list slurmd_files
  host=$(hostname -s)
  [ "$user_signal" = 1 ] && params="SlurmctldParameters=preempt_send_user_signal"
  if [ "$nodes" = 1 ]; then
    node="$(slurmd -C | head -n 1) State=UNKNOWN"  # NodeName=<host> CPUs=... as this machine has them
    list=$host
    slurmd_files="SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
  else
    node=$(node_lines "$nodes")
    list="node[1-$nodes]"
    ctld_addr=$SUBNET.1  # the bridge: the nodes' namespaces reach the root namespace there
    # %n: the node name, so each slurmd of this machine keeps its own spool, PID and log file.
    slurmd_files="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
  fi
  cat >"$CONF.tmp" <<EOF
# Written by tools/slurm_local.sh; rewritten on each start.
ClusterName=llip-local
SlurmctldHost=$host($ctld_addr)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible cred_expire + 1 s after it stopped (121 s by default).
AuthInfo=cred_expire=30
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$slurmd_files
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
$node
PartitionName=debug Nodes=$list Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S
PartitionName=urgent Nodes=$list MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
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

munge_answers() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  running munged && return 0
  # One munged per machine: another instance's (or the system's) serves this one too. Only a
  # munged this instance started (its PID file linked here) is stopped by `stop`.
  munge_answers && return 0
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

# ---------------------------------------------------------------------------------------------
# nodes: one slurmd here, or N slurmd each in its own network + UTS namespace
# ---------------------------------------------------------------------------------------------

node_count() { cat "$DIR/run/nodes" 2>/dev/null || echo 1; }
ns_name() { echo "$TAG-node$1"; }
our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$TAG-node[0-9]+\$" || true; }

check_subnet() {  # the /24 must be private and used by nothing on this machine but our bridge
  [[ $SUBNET =~ ^(10\.[0-9]+\.[0-9]+|192\.168\.[0-9]+|172\.(1[6-9]|2[0-9]|3[01])\.[0-9]+)$ ]] ||
    die "LLIP_SLURM_SUBNET=$SUBNET is not the first three octets of a private /24 (e.g. 10.251.7)"
  local used
  used=$(ip -4 -o route show | grep -E "^$SUBNET\.[0-9]+(/| )" | grep -v " dev $BRIDGE " || true)
  [ -z "$used" ] || die "the subnet $SUBNET.0/24 is in use here ($used); set LLIP_SLURM_SUBNET to a free one"
}

hosts_line() { echo "$SUBNET.$((10 + $1)) node$1 $HOSTS_MARK"; }

add_hosts() {  # one /etc/hosts line per node, each ending with this instance's mark
  local nodes=$1 k line
  for k in $(seq 1 "$nodes"); do
    line=$(hosts_line "$k")
    grep -qxF "$line" /etc/hosts && continue
    if grep -v -- "$HOSTS_MARK\$" /etc/hosts | grep -qE "^[^#]*[[:space:]]node$k([[:space:]]|\$)"; then
      die "/etc/hosts already names a host node$k; remove that line or stop the instance that added it"
    fi
    echo "$line" >>/etc/hosts
  done
}

remove_hosts() {  # exactly the lines this instance added; /etc/hosts is rewritten in place
  grep -q -- " $HOSTS_MARK\$" /etc/hosts || return 0
  local kept
  kept=$(grep -v -- " $HOSTS_MARK\$" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts
}

setup_network() {  # bridge with slurmctld's address, then per node: namespace, veth, address
  local nodes=$1 k ns veth
  check_subnet
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for k in $(seq 1 "$nodes"); do
    ns=$(ns_name "$k") veth=${TAG}n$k
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    ip link show "$veth" >/dev/null 2>&1 || ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" addr replace "$SUBNET.$((10 + k))/24" dev eth0  # no default route: nothing leaves
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  add_hosts "$nodes"
}

teardown_network() {  # every process left in our namespaces, the namespaces, links, hosts lines
  local ns pids veth
  for ns in $(our_namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      kill $pids 2>/dev/null || true
      for _ in $(seq 1 150); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.2; done
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns"
  done
  for veth in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${TAG}n[0-9]+\$" || true); do
    ip link del "$veth" 2>/dev/null || true  # gone with its peer's namespace, normally
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  remove_hosts
}

start_node() {  # start_node K: slurmd -N nodeK inside nodeK's namespaces, hostname nodeK
  local k=$1
  running "slurmd-node$k" && return 0
  mkdir -p "$DIR/spool/node$k"
  # slurmd daemonizes; it and every task it forks stay in these namespaces. nsenter rather than
  # `ip netns exec`, which would also remount /sys and hide the cgroup mount slurmd checks.
  nsenter --net="/run/netns/$(ns_name "$k")" -- unshare --uts sh -c "hostname node$k && exec slurmd -N node$k"
}

nodes_up() {  # nodes_up N: N nodes of the debug partition are usable
  [ "$(sinfo -h -N -p debug -o %T | grep -cE '^(idle|mixed|allocated)')" -ge "$1" ]
}

start_slurm() {
  local nodes=$1 k
  if running slurmctld; then
    scontrol reconfigure >/dev/null  # picks up a changed slurm.conf (e.g. --user-signal)
  else
    slurmctld -c  # a fresh start forgets the jobs of an earlier one
  fi
  wait_for slurmctld scontrol ping
  if [ "$nodes" = 1 ]; then
    running slurmd || slurmd
  else
    for k in $(seq 1 "$nodes"); do start_node "$k"; done
  fi
  wait_for "the nodes" nodes_up "$nodes"
  wait_for "accounting" sacct -n -X -S now
}

stop_nodes() {  # every slurmd of this instance, then its namespaces
  local pidfile
  stop_one slurmd
  for pidfile in "$DIR"/run/slurmd-node*.pid; do
    [ -e "$pidfile" ] && stop_one "$(basename "$pidfile" .pid)"
  done
  teardown_network
}

cmd_start() {
  local user_signal=0 nodes=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --user-signal) user_signal=1 ;;
      --nodes) shift; nodes=${1:-} ;;
      --nodes=*) nodes=${1#--nodes=} ;;
      *) die "unknown option '$1'; usage: tools/slurm_local.sh start [--nodes N] [--user-signal]" ;;
    esac
    shift
  done
  [[ $nodes =~ ^[1-9][0-9]?$ ]] || die "--nodes must be a number from 1 to 99, got '$nodes'"
  require_root
  mkdir -p "$DIR"/{etc,log,run,state,spool}
  install_packages
  if running slurmctld && [ "$(node_count)" != "$nodes" ]; then
    log "restarting slurmctld and the nodes: $(node_count) node(s) running, $nodes asked for"
    stop_nodes
    stop_one slurmctld
  fi
  write_slurm_conf "$user_signal" "$nodes"
  write_slurmdbd_conf
  start_munge
  start_mariadb
  start_slurmdbd
  [ "$nodes" = 1 ] || setup_network "$nodes"
  echo "$nodes" >"$DIR/run/nodes"
  start_slurm "$nodes"
  log "running with $nodes node(s) (preemption sends $([ "$user_signal" = 1 ] && echo "the job's --signal" || echo TERM)); clients need: export SLURM_CONF=$CONF"
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

stop_munge() {  # only a munged this instance started, and only when no other Slurm uses it
  [ -e "$DIR/run/munged.pid" ] || return 0
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || pgrep -x slurmdbd >/dev/null; then
    log "left munged running: other Slurm daemons on this machine use it"
    rm -f "$DIR/run/munged.pid"
    return 0
  fi
  stop_one munged
}

cmd_stop() {
  stop_nodes
  for name in slurmctld slurmdbd mariadb; do stop_one "$name"; done
  stop_munge
  rm -f "$DIR/run/nodes"
  log "stopped"
}

node_state() { scontrol ping >/dev/null 2>&1 && sinfo -h -N -p debug -n "$1" -o %T 2>/dev/null | head -n 1; }

cmd_status() {
  local ok=0 nodes k name
  nodes=$(node_count)
  if running munged; then echo "munged: running (pid $(cat "$DIR/run/munged.pid"))"
  elif munge_answers; then echo "munged: running (shared; started outside this instance)"
  else echo "munged: stopped"; ok=1; fi
  for name in mariadb slurmdbd slurmctld; do
    if running "$name"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"; else echo "$name: stopped"; ok=1; fi
  done
  if [ "$nodes" = 1 ]; then
    if running slurmd; then echo "slurmd: running (pid $(cat "$DIR/run/slurmd.pid"))"; else echo "slurmd: stopped"; ok=1; fi
    return $ok
  fi
  for k in $(seq 1 "$nodes"); do
    name=slurmd-node$k
    if running "$name"; then
      echo "node$k: slurmd running (pid $(cat "$DIR/run/$name.pid")), namespace $(ns_name "$k"), address $SUBNET.$((10 + k)), state $(node_state "node$k" || echo unknown)"
    else
      echo "node$k: slurmd stopped, namespace $(ns_name "$k"), address $SUBNET.$((10 + k))"; ok=1
    fi
  done
  return $ok
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: tools/slurm_local.sh start [--nodes N] [--user-signal] | stop | status | env" ;;
esac
