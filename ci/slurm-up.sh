#!/usr/bin/env bash
# Start a real Slurm cluster on this machine, on loopback, for the test suite (scripts/test.sh runs this under
# CI=true or M3LEO_START_SLURM=1, and ci/slurm-down.sh at exit). Idempotent: a second run with the daemons up only
# checks that the nodes answer.
#
#   1. installs slurmctld, slurmd, slurm-client and munge with apt when missing (root only);
#   2. writes slurm.conf for this host (/etc/slurm/slurm.conf, or $SLURM_CONF) — never over one it did not write;
#   3. starts munged (unless one is already running), slurmctld, and one slurmd per node; the daemons write their
#      PID files under $SLURM_CI_RUN_DIR (/run/ci-slurm), which is what slurm-down.sh stops;
#   4. waits until every node answers and prints "SLURM READY".
#
# Node layout: by default TWO emulated nodes on this one machine, "<host>" and "<host>x1", each a slurmd of its
# own with all of this machine's CPUs. One cluster then runs both the 1 node x 2 tasks and the 2 nodes x 1 task
# jobs the tests need, with no restart in between. The cost: the cluster advertises twice the real CPUs, so jobs
# on both nodes at once share the cores; the tests run one job at a time and ask for 1 CPU per task.
#
# Environment:
#   SLURM_CI_EXTRA_NODES=N   emulated nodes beside the first (default 1; 0 = a single node)
#   SLURM_CI_NODE_CPUS=N     CPUs each node advertises (default: nproc)
#   SLURM_CI_CTLD_PORT=P     slurmctld port (default 6817); slurmd ports are SLURM_CI_NODE_PORT (6818), +1, ...
#   SLURM_CI_FORCE=1         move an existing slurm.conf that slurm-up did not write aside (to *.bak-DATE) instead
#                            of refusing
#   SLURM_CI_TIMEOUT=S       seconds to wait for the daemons and nodes (default 60)
#   SLURM_CI_RUN_DIR, SLURM_CI_STATE_DIR, SLURM_CI_LOG_DIR, SLURM_CONF: see ci/slurm-common.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/slurm-common.sh
. "$here/slurm-common.sh"

t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

EXTRA=${SLURM_CI_EXTRA_NODES:-1}
CPUS=${SLURM_CI_NODE_CPUS:-$(nproc)}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-6817}
NODE_PORT=${SLURM_CI_NODE_PORT:-6818}
TIMEOUT=${SLURM_CI_TIMEOUT:-60}
[[ $EXTRA =~ ^[0-9]+$ ]] || die "SLURM_CI_EXTRA_NODES must be a number, got '$EXTRA'"
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "SLURM_CI_NODE_CPUS must be a positive number, got '$CPUS'"

# Node names follow the machine's hostname (CI's need not be "vm"), but every address in the config is 127.0.0.1,
# so neither DNS nor /etc/hosts matters for Slurm's own traffic.
HOST=$(hostname -s)
NODES=("$HOST")
for ((i = 1; i <= EXTRA; i++)); do NODES+=("${HOST}x$i"); done

# ---------------------------------------------------------------- refuse to fight a Slurm we did not start
ours_ctld=$(pid_from "$SLURM_CI_RUN_DIR/slurmctld.pid")
for pid in $(pids_named slurmctld); do
  [ "$pid" = "$ours_ctld" ] || die "a slurmctld not started by slurm-up is running (pid $pid); not starting another"
done
ours_d=" "
for f in "$SLURM_CI_RUN_DIR"/slurmd-*.pid; do [ -e "$f" ] && ours_d+="$(pid_from "$f") "; done
for pid in $(pids_named slurmd); do
  [[ $ours_d == *" $pid "* ]] || die "a slurmd not started by slurm-up is running (pid $pid); not starting another"
done

# ---------------------------------------------------------------- packages
missing=()
for p in slurmctld slurmd slurm-client munge; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || die "Slurm is not installed (${missing[*]}) and installing it needs root"
  export DEBIAN_FRONTEND=noninteractive
  # Without systemd, the packages' postinst would try /etc/init.d scripts; a policy-rc.d that exits 101 stops apt
  # from starting any daemon. Keep one that exists, put a temporary one in place otherwise.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # apt-get update only when the lists do not know the packages (a fresh image), or when an install from stale
  # lists fails; it costs a second or more otherwise.
  if ! apt-cache show --no-all-versions "${missing[@]}" >/dev/null 2>&1; then
    log "apt-get update"
    apt-get update -qq
  fi
  log "installing ${missing[*]}"
  apt_install() { apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
  if ! apt_install; then
    log "install failed; refreshing the package lists and retrying"
    apt-get update -qq
    apt_install
  fi
  log "installed in $(elapsed) s"
fi
command -v slurmctld >/dev/null || die "slurmctld is not on PATH after installing"

# ---------------------------------------------------------------- slurm.conf
mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
# Memory is not a consumable resource here (CR_CPU, no cgroup): RealMemory only bounds what a job may ask with
# --mem, so leave the OS a little and let each node offer the rest.
real_mem=$((mem_mb > 2048 ? mem_mb - 1024 : mem_mb))
conf=$(
  cat <<EOF
$SLURM_CI_MARK for this machine's test cluster. It is rewritten by
# that script; stop the cluster with ci/slurm-down.sh before changing anything.
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s; < 5 is rejected)
AuthInfo=cred_expire=10
# no cgroup in CI's VM: plain process tracking, no task binding, no memory enforcement
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# schedule every 5 s instead of 60/30 s, so a requeued or dependent job starts within seconds
SchedulerParameters=bf_interval=5,sched_interval=5
# trust the CPUs and RealMemory below rather than what each slurmd detects (needed for emulated nodes)
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$SLURM_CI_STATE_DIR/ctld
SlurmdSpoolDir=$SLURM_CI_STATE_DIR/d-%n
SlurmctldPidFile=$SLURM_CI_RUN_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_CI_RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$SLURM_CI_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_CI_LOG_DIR/slurmd-%n.log
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$((NODE_PORT + i))" \
      "CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$real_mem State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
)

running() {  # any daemon of ours alive?
  local f
  pidfile_alive "$SLURM_CI_RUN_DIR/slurmctld.pid" slurmctld && return 0
  for f in "$SLURM_CI_RUN_DIR"/slurmd-*.pid; do
    [ -e "$f" ] && pidfile_alive "$f" slurmd && return 0
  done
  return 1
}

if [ -e "$SLURM_CI_CONF" ] && ! head -n 1 "$SLURM_CI_CONF" | grep -qF "$SLURM_CI_MARK"; then
  [ "${SLURM_CI_FORCE:-}" = 1 ] ||
    die "$SLURM_CI_CONF exists and was not written by slurm-up; move it away or set SLURM_CI_FORCE=1 to back it up"
  backup="$SLURM_CI_CONF.bak-$(date +%Y%m%d-%H%M%S)"
  mv "$SLURM_CI_CONF" "$backup"
  log "moved the existing $SLURM_CI_CONF to $backup"
fi
if [ "$(cat "$SLURM_CI_CONF" 2>/dev/null || true)" != "$conf" ]; then
  if running; then
    die "the cluster is running with another configuration (nodes or CPUs changed?); run ci/slurm-down.sh first"
  fi
  [ "$(id -u)" = 0 ] || die "writing $SLURM_CI_CONF and starting the daemons needs root"
  mkdir -p "$(dirname "$SLURM_CI_CONF")"
  printf '%s\n' "$conf" >"$SLURM_CI_CONF.tmp.$$"
  mv "$SLURM_CI_CONF.tmp.$$" "$SLURM_CI_CONF"
  log "wrote $SLURM_CI_CONF (${#NODES[@]} node(s): ${NODES[*]}, $CPUS CPUs each)"
fi
export SLURM_CONF=$SLURM_CI_CONF

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  [ "$(id -u)" = 0 ] || die "munged is not running and starting it needs root"
  if [ ! -s /etc/munge/munge.key ]; then  # the package's postinst normally creates it
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge  # tmpfs; systemd-tmpfiles would create it
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  for ((i = 0; i < TIMEOUT * 10; i++)); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not answer within $TIMEOUT s"
  mkdir -p "$SLURM_CI_RUN_DIR"
  # Recorded only because we started it: slurm-down stops munged only when this file exists.
  pid_from /run/munge/munged.pid >"$SLURM_CI_RUN_DIR/munged.pid"
  log "started munged (pid $(cat "$SLURM_CI_RUN_DIR/munged.pid"))"
fi

# ---------------------------------------------------------------- slurmctld and slurmd
mkdir -p "$SLURM_CI_RUN_DIR" "$SLURM_CI_STATE_DIR/ctld" "$SLURM_CI_LOG_DIR"
for n in "${NODES[@]}"; do mkdir -p "$SLURM_CI_STATE_DIR/d-$n"; done

wait_for() {  # wait_for WHAT CMD...: poll CMD every 0.1 s for up to TIMEOUT seconds
  local what=$1 i
  shift
  for ((i = 0; i < TIMEOUT * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not come up within $TIMEOUT s; see $SLURM_CI_LOG_DIR"
}

if ! pidfile_alive "$SLURM_CI_RUN_DIR/slurmctld.pid" slurmctld; then
  rm -f "$SLURM_CI_RUN_DIR/slurmctld.pid"
  # -i: start even if the saved state is unreadable (after a SIGKILL, say) rather than refuse to start
  slurmctld -i -f "$SLURM_CI_CONF"
  wait_for slurmctld scontrol ping
  log "started slurmctld (pid $(pid_from "$SLURM_CI_RUN_DIR/slurmctld.pid"))"
fi
for n in "${NODES[@]}"; do
  pidf="$SLURM_CI_RUN_DIR/slurmd-$n.pid"
  if ! pidfile_alive "$pidf" slurmd; then
    rm -f "$pidf"
    slurmd -f "$SLURM_CI_CONF" -N "$n"
    wait_for "slurmd $n" pidfile_alive "$pidf" slurmd
    log "started slurmd $n (pid $(pid_from "$pidf"))"
  fi
done

# ---------------------------------------------------------------- wait until every node answers
# Ready = every node idle, or mixed/allocated when jobs already run (a rerun while tests are going). A node left
# DOWN/DRAINED by an unclean stop is resumed; a trailing "*" means the node does not answer yet.
ready=0
for ((i = 0; i < TIMEOUT * 2; i++)); do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
  bad=$(awk '$2 !~ /^(idle|mix|alloc)$/' <<<"$states")
  if [ -n "$states" ] && [ -z "$bad" ] && [ "$(wc -l <<<"$states")" -ge "${#NODES[@]}" ]; then
    ready=1
    break
  fi
  for n in $(awk '$2 ~ /^(down|drain|drng|fail)$/ { print $1 }' <<<"$bad"); do
    scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
  done
  sleep 0.5
done
[ "$ready" = 1 ] || die "nodes not ready after $TIMEOUT s: $(tr '\n' ' ' <<<"$states"); see $SLURM_CI_LOG_DIR"
echo "SLURM READY: ${#NODES[@]} node(s) ${NODES[*]}, $CPUS CPUs each, conf $SLURM_CI_CONF ($(elapsed) s)"
