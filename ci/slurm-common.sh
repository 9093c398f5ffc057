# Shared by ci/slurm-up.sh and ci/slurm-down.sh (sourced, not run): where the CI cluster keeps its files, and the
# PID bookkeeping that lets slurm-down stop exactly the daemons slurm-up started.
# Every path can be moved with an environment variable; both scripts must then see the same values.

SLURM_CI_RUN_DIR=${SLURM_CI_RUN_DIR:-/run/ci-slurm}          # PID files (ours and the daemons')
SLURM_CI_STATE_DIR=${SLURM_CI_STATE_DIR:-/var/spool/ci-slurm}  # slurmctld state, slurmd spools
SLURM_CI_LOG_DIR=${SLURM_CI_LOG_DIR:-/var/log/ci-slurm}        # daemon logs
# The clients (sbatch, squeue, ...) read /etc/slurm/slurm.conf unless SLURM_CONF names another file; writing the
# default location is what lets a plain `sbatch` work in CI. A conf we did not write is never overwritten.
SLURM_CI_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
SLURM_CI_MARK="# Written by m3leo-stream ci/slurm-up.sh"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# pid_alive PID NAME: true when PID runs and its /proc/PID/comm is NAME. A stale PID file may name a PID that the
# kernel has since given to an unrelated process; the comm check keeps us from signalling it.
pid_alive() {
  local pid=$1 name=$2 comm stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$name" ] || return 1
  # A zombie (state Z: exited, not yet reaped by PID 1, which is not always a reaping init in a sandbox) is gone.
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# pid_from FILE: the PID in FILE, or nothing.
pid_from() { [ -r "$1" ] && tr -dc '0-9' <"$1" || true; }

# pidfile_alive FILE NAME: the PID recorded in FILE is alive and is NAME.
pidfile_alive() { pid_alive "$(pid_from "$1")" "$2"; }

# pids_named NAME: every running (not zombie) process whose comm is NAME.
pids_named() {
  local f pid
  for f in /proc/[0-9]*/comm; do
    pid=${f#/proc/}
    pid=${pid%/comm}
    pid_alive "$pid" "$1" && echo "$pid"
  done
  return 0
}
