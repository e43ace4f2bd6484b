#!/usr/bin/env bash
# A SLURM for the tests on this one host (Debian's slurm-wlm 22.05, as root, no systemd; issue 30).
#   slurm_up.sh up [--accounting] [--nodes N]
#                       install what is missing, write slurm.conf, start munged, slurmctld and
#                       one slurmd per node (and MariaDB + slurmdbd with --accounting; without it,
#                       accounting is turned off), wait until every node takes jobs; already so:
#                       only checks. N nodes (default 1): one is named by the host; more are
#                       <host>-1..<host>-N, each a `slurmd -N <name>` on its own port (from 6820:
#                       slurmdbd has 6819), so that multi-node jobs (srun --nodes N) run here
#   slurm_up.sh down    stop the daemons this script started, nothing else
#   slurm_up.sh status  what runs, and sinfo
# Every daemon it starts keeps its pid file under /run/slurm-test, so `down` knows its own.
# SLURM_PARTITION_NAME names the one partition (default: debug).
set -euo pipefail

PATH=$PATH:/usr/sbin:/sbin # the daemons
PART=${SLURM_PARTITION_NAME:-debug}
CLUSTER=testcluster
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
RUN=/run/slurm-test
LOG=/var/log/slurm-test
CTLD_PID=$RUN/slurmctld.pid
SLURMD_PID=$RUN/slurmd.pid
DBD_PID=$RUN/slurmdbd.pid
# munged and mariadbd drop to their own users: their pid files go in directories those users own
MUNGE_PID=$RUN/munge/munged.pid
DB_PID=$RUN/mysql/mariadbd.pid
DB_SOCK=/run/mysqld/mysqld.sock # slurmdbd's StorageHost=localhost means the default socket
CORE_PKGS=(munge slurmctld slurmd slurm-client)
ACCT_PKGS=(slurmdbd mariadb-server)

die() {
  echo "slurm_up.sh: $*" >&2
  exit 1
}

running() { # pid [program]: a process runs under that pid (a zombie does not count), that
  # program if named
  local stat
  [ -z "${2:-}" ] || [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

ours() { # pidfile program: a daemon this script started is running
  [ -s "$1" ] && running "$(cat "$1")" "$2"
}

ready() { # name...: slurmctld knows these nodes and no others, and each takes jobs
  local listed
  # sinfo alone retries for 9 s where no slurmctld runs
  scontrol ping >/dev/null 2>&1 || return 1
  listed=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)
  [ "$(cut -d' ' -f1 <<<"$listed")" = "$(printf '%s\n' "$@" | sort)" ] &&
    ! grep -qvE ' (idle|mixed|allocated|completing)$' <<<"$listed"
}

names() { # count: the nodes' names, one a line
  local i host
  host=$(hostname -s)
  if [ "$1" -eq 1 ]; then
    echo "$host"
  else
    for ((i = 1; i <= $1; i++)); do echo "$host-$i"; done
  fi
}

slurmd_pid() { # count name: that node's slurmd pid file (slurm.conf's SlurmdPidFile)
  if [ "$1" -eq 1 ]; then echo "$SLURMD_PID"; else echo "$RUN/slurmd-$2.pid"; fi
}

all_slurmd() { # stop's arguments for each slurmd pid file this script's slurm.conf named
  local f
  for f in "$SLURMD_PID" "$RUN"/slurmd-*.pid; do
    if [ -e "$f" ]; then printf '%s\nslurmd\n' "$f"; fi
  done
}

apt_install() { # package...: apt-get them, once more after an update if the lists were stale
  command -v apt-get >/dev/null || die "missing $*, and there is no apt-get to install them"
  local out
  out=$(mktemp)
  echo "installing $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "$@" >"$out" 2>&1; then
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } \
      >"$out" 2>&1; then
      tail -5 "$out" >&2
      rm -f "$out"
      die "apt-get could not install $*"
    fi
  fi
  rm -f "$out"
}

replace() { # file text [mode owner]: write it via a rename; succeeds only if the file changed
  [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && return 1
  (umask 077 && printf '%s\n' "$2" >"$1.tmp")
  chmod "${3:-644}" "$1.tmp"
  chown "${4:-root:root}" "$1.tmp"
  mv "$1.tmp" "$1"
}

nodes_conf() { # count: the NodeName lines and the partition line
  local host node mem name port=6820 list=() # 6817: slurmctld, 6818: SlurmdPort, 6819: slurmdbd
  host=$(hostname -s)
  # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24151"
  node=$(slurmd -C | head -1 | sed 's/ Boards=[0-9]*//')
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  # 5% headroom, so that slurmd's memory check never drains a node; the nodes share the memory
  node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100 / $1))/" <<<"$node")
  while read -r name; do
    if [ "$1" -eq 1 ]; then
      echo "$node State=UNKNOWN"
    else # and each has all of the host's CPUs, as processes on one machine share them
      echo "${node/#NodeName=$host /NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$port }" \
        "State=UNKNOWN"
    fi
    list+=("$name")
    port=$((port + 1))
  done < <(names "$1")
  echo "PartitionName=$PART Nodes=$(IFS=, && echo "${list[*]}") Default=YES MaxTime=INFINITE State=UP"
}

conf() { # accounting (yes|no), node count: slurm.conf's text
  local host storage=none slurmd=slurmd
  host=$(hostname -s)
  [ "$1" = yes ] && storage=slurmdbd
  # several slurmd on one host: %n (the node's name) keeps their files apart
  [ "$2" -eq 1 ] || slurmd=slurmd/%n
  cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/$slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$(slurmd_pid "$2" %n)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/${slurmd/\//-}.log
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job with no --mem gets the whole node and jobs run one at a time
DefMemPerCPU=1000
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# memory use sampled every second and a job step over its --mem killed (no cgroups here)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/$storage
JobCompType=jobcomp/none
MpiDefault=none
# squeue must still show a finished job when Snakemake's status check comes (issue 30)
MinJobAge=300
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
$(nodes_conf "$2")
EOF
}

dirs() {
  mkdir -p /etc/slurm "$RUN/munge" "$LOG" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
  chown slurm:slurm "$LOG" /var/lib/slurm/slurmctld
  chown munge:munge "$RUN/munge"
}

start_munge() { # unless a munged (ours or not) already answers
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
  [ -s /etc/munge/munge.key ] || mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge
  chown munge:munge /run/munge
  chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

start_db() { # MariaDB with slurmdbd's database and user
  ours "$DB_PID" mariadbd && return 0
  mkdir -p "$RUN/mysql" /run/mysqld
  chown mysql:mysql "$RUN/mysql" /run/mysqld
  # mariadbd segfaults when it cannot write its log: the file must exist and be mysql's
  touch "$LOG/mariadb.log"
  chown mysql:mysql "$LOG/mariadb.log"
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  # it stays in the foreground: background it, detached; it writes its own pid file
  setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$DB_SOCK" \
    --pid-file="$DB_PID" --bind-address=127.0.0.1 --log-error="$LOG/mariadb.log" \
    </dev/null >/dev/null 2>&1 &
  for _ in $(seq 150); do
    mariadb-admin --socket="$DB_SOCK" ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  mariadb --socket="$DB_SOCK" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmtest';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" ||
    die "MariaDB does not answer on $DB_SOCK (see $LOG/mariadb.log)"
}

start_dbd() {
  if replace "$DBD_CONF" "AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=$DBD_PID
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmtest" 600 slurm:slurm; then
    stop "$DBD_PID" slurmdbd
  fi
  ours "$DBD_PID" slurmdbd || /usr/sbin/slurmdbd
}

add_cluster() { # once slurmdbd answers (sacctmgr needs slurm.conf to name it first)
  # its first start creates its tables, which takes a while
  for _ in $(seq 300); do
    sacctmgr -n list cluster >/dev/null 2>&1 && break
    sleep 0.2
  done
  sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" ||
    sacctmgr -i add cluster "$CLUSTER" >/dev/null ||
    die "slurmdbd does not answer (see $LOG/slurmdbd.log)"
}

stop() { # pidfile program...: SIGTERM those of ours that run, wait until all are gone
  local pids=() names=() i
  while [ $# -gt 0 ]; do
    if ours "$1" "$2"; then
      pids+=("$(cat "$1")")
      names+=("$2")
    fi
    rm -f "$1"
    shift 2
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  echo "stopping ${names[*]} (${pids[*]})"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 300); do
    for i in "${!pids[@]}"; do
      running "${pids[i]}" "${names[i]}" || unset "pids[i]" "names[i]"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  echo "killed ${names[*]} (${pids[*]}): still running 30 s after SIGTERM" >&2
}

slurmd_registered() { # since (date, to the second) name:pid...: those nodes' slurmd, started
  # then, have registered ("None" until a new node's first slurmd has)
  local since=$1 node started
  shift
  for node in "$@"; do
    started=$(scontrol show node -o "${node%:*}" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' |
      cut -d= -f2)
    [[ $started =~ ^[0-9] ]] && ! [[ $started < $since ]] || return 1
  done
}

slurmd_gone() { # name:pid...: the first of those nodes whose slurmd stopped (its port is taken,
  # say), so that `up` says so at once rather than after 60 s
  local node
  for node in "$@"; do
    if ! running "${node##*:}"; then
      echo "${node%:*}"
      return 0
    fi
  done
  return 1
}

wait_ready() { # count since name:pid...: all nodes take jobs; those whose slurmd started then
  # have registered (slurmctld recovers a node's state from its last run: it may look idle before)
  local t0=$SECONDS since=$2 nodes down gone log=$LOG/slurmd.log
  mapfile -t nodes < <(names "$1")
  [ "$1" -eq 1 ] || log=$LOG/slurmd-%n.log
  shift 2
  until ready "${nodes[@]}" && slurmd_registered "$since" "$@"; do
    if gone=$(slurmd_gone "$@"); then
      log=${log/\%n/$gone}
      tail -n 5 "$log" >&2 || true
      die "the slurmd of node $gone stopped as it started (see $log)"
    fi
    # a node left down or drained by an earlier run is brought back
    down=$(sinfo -h -N -o '%N %T' 2>/dev/null | sed -nE 's/^([^ ]+) (down|drain).*/\1/p' |
      sort -u | paste -sd,)
    if [ -n "$down" ]; then
      scontrol update NodeName="$down" State=RESUME 2>/dev/null || true
    fi
    if [ $((SECONDS - t0)) -ge 60 ]; then
      sinfo -N -l >&2 || true
      tail -n 20 "$LOG"/slurm*.log >&2 || true
      die "not all of the ${#nodes[@]} node(s) take jobs after 60 s"
    fi
    sleep 0.2
  done
}

up() { # accounting (yes|no), node count
  local t0=${EPOCHREALTIME/./} ms dbd_up=no since name old=() started=() text
  [ "$(id -u)" -eq 0 ] || die "must run as root: it writes /etc/slurm and starts daemons"
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v sinfo >/dev/null || apt_install "${CORE_PKGS[@]}"
  if [ "$1" = yes ]; then
    command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null || apt_install "${ACCT_PKGS[@]}"
  fi
  dirs
  start_munge
  if [ "$1" = yes ]; then
    ours "$DBD_PID" slurmdbd && dbd_up=yes
    start_db
    start_dbd
  fi
  text=$(conf "$1" "$2") # on its own, so that a failing conf stops here (set -e)
  if replace "$CONF" "$text"; then
    mapfile -t old < <(all_slurmd)
    stop "$CTLD_PID" slurmctld "${old[@]}" # to read the new slurm.conf
  fi
  # with slurmdbd and slurmctld already up, the cluster was added when they started
  if [ "$1" = yes ] && ! { [ "$dbd_up" = yes ] && ours "$CTLD_PID" slurmctld; }; then
    add_cluster
  fi
  ours "$CTLD_PID" slurmctld || /usr/sbin/slurmctld
  since=$(date +%Y-%m-%dT%H:%M:%S)
  while read -r name; do
    if ! ours "$(slurmd_pid "$2" "$name")" slurmd; then
      # in the foreground, detached: its pid tells whether it stopped as it started
      setsid /usr/sbin/slurmd -D -N "$name" </dev/null >/dev/null 2>&1 &
      started+=("$name:$!")
    fi
  done < <(names "$2")
  wait_ready "$2" "$since" "${started[@]}"
  if [ "$1" = yes ]; then
    echo "accounts: $(sacctmgr -n -P list account format=account | paste -sd ' ')"
  else
    stop "$DBD_PID" slurmdbd
    stop "$DB_PID" mariadbd
  fi
  ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
  printf 'slurm up in %d.%d s (accounting: %s, nodes: %d)\n' $((ms / 1000)) $((ms % 1000 / 100)) \
    "$1" "$2"
}

down() {
  local slurmds
  [ "$(id -u)" -eq 0 ] || die "must run as root: it stops root's daemons"
  mapfile -t slurmds < <(all_slurmd)
  # slurmdbd writes to MariaDB and every daemon talks through munged as it stops: those go last
  stop "${slurmds[@]}" "$CTLD_PID" slurmctld "$DBD_PID" slurmdbd
  stop "$DB_PID" mariadbd "$MUNGE_PID" munged
}

status() {
  local f name nodes=()
  mapfile -t nodes < <(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF" 2>/dev/null)
  for f in "$MUNGE_PID munged" "$CTLD_PID slurmctld" "$DBD_PID slurmdbd" "$DB_PID mariadbd"; do
    name=${f#* }
    f=${f%% *}
    if ours "$f" "$name"; then
      echo "$name: running ($(cat "$f"))"
    else
      echo "$name: not started by slurm_up.sh"
    fi
  done
  for name in "${nodes[@]}"; do
    f=$(slurmd_pid "${#nodes[@]}" "$name")
    if ours "$f" slurmd; then
      echo "slurmd $name: running ($(cat "$f"))"
    else
      echo "slurmd $name: not started by slurm_up.sh"
    fi
  done
  grep -s '^AccountingStorageType=' "$CONF" || true
  if scontrol ping >/dev/null 2>&1; then sinfo -N -l; else echo "no slurmctld answers"; fi
}

usage() {
  echo "usage: $0 up [--accounting] [--nodes N] | down | status" >&2
  exit 2
}

main() {
  local accounting=no nodes=1
  case "${1:-}" in
  up)
    shift
    while [ $# -gt 0 ]; do
      case "$1" in
      --accounting) accounting=yes ;;
      --nodes)
        [ $# -ge 2 ] || usage
        nodes=$2
        shift
        ;;
      *) usage ;;
      esac
      shift
    done
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes takes a node count (1 or more), not '$nodes'"
    up "$accounting" "$nodes"
    ;;
  down | status)
    [ $# -eq 1 ] || usage
    "$1"
    ;;
  *) usage ;;
  esac
}

main "$@"
