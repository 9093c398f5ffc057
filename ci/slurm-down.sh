#!/usr/bin/env bash
# Stop the test cluster that ci/slurm-up.sh started, and nothing else.
#
#   1. cancels the cluster's jobs (only when its slurmctld is ours) and waits for them to end, so that no job step
#      (slurmstepd and the tasks under it) outlives the daemons;
#   2. sends SIGTERM to the PIDs recorded under $SLURM_CI_RUN_DIR — slurmd(s), slurmctld, and munged only when
#      slurm-up started it — after checking /proc/PID/comm still names that daemon; SIGKILL after
#      $SLURM_CI_STOP_TIMEOUT seconds (default 20; slurmctld saves its state on SIGTERM, which takes a few seconds);
#   3. with SLURM_CI_PURGE=1, deletes the state (job records, job ids restart at 1) and the logs.
# Safe to run twice, or when nothing runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/slurm-common.sh
. "$here/slurm-common.sh"
STOP_TIMEOUT=${SLURM_CI_STOP_TIMEOUT:-20}
export SLURM_CONF=$SLURM_CI_CONF

# ---------------------------------------------------------------- jobs
if pidfile_alive "$SLURM_CI_RUN_DIR/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    # scancel sends SIGTERM, then SIGKILL after KillWait (30 s); a job that ignores SIGTERM gets SIGKILL after 10 s
    for ((i = 0; i < 40; i++)); do
      [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break
      # shellcheck disable=SC2086
      [ "$i" = 20 ] && scancel --full --signal=KILL $jobs 2>/dev/null || true
      sleep 0.5
    done
    left=$(squeue -h -o '%A %T' 2>/dev/null | tr '\n' ' ' || true)
    [ -z "${left// /}" ] || log "WARNING: jobs still listed after cancelling: $left"
  fi
fi

# ---------------------------------------------------------------- daemons
# stop FILE...: SIGTERM the daemon recorded in each PID file (named by the file: slurmd-<node>.pid -> slurmd),
# wait up to STOP_TIMEOUT s for all of them, SIGKILL what is left; then remove the files.
stop() {
  local f pid name i j left=()
  local -a pids=() names=()
  for f in "$@"; do
    [ -e "$f" ] || continue
    pid=$(pid_from "$f")
    name=$(basename "$f" .pid)
    name=${name%%-*}
    if pid_alive "$pid" "$name"; then
      kill -TERM "$pid" 2>/dev/null || true
      log "SIGTERM $(basename "$f" .pid) (pid $pid)"
      pids+=("$pid") names+=("$name")
    elif [ -n "$pid" ]; then
      log "$(basename "$f" .pid): pid $pid is gone or now another program; leaving it alone"
    fi
  done
  for ((i = 0; i <= STOP_TIMEOUT * 10; i++)); do
    left=()
    for j in "${!pids[@]}"; do pid_alive "${pids[$j]}" "${names[$j]}" && left+=("$j"); done
    ((${#left[@]})) || break
    sleep 0.1
  done
  for j in "${left[@]}"; do
    log "SIGKILL ${names[$j]} (pid ${pids[$j]}): still running after $STOP_TIMEOUT s"
    kill -KILL "${pids[$j]}" 2>/dev/null || true
  done
  rm -f "$@"
}
stop "$SLURM_CI_RUN_DIR"/slurmd-*.pid "$SLURM_CI_RUN_DIR/slurmctld.pid"
# munged last, and only when slurm-up started it (it wrote munged.pid then): the Slurm daemons need it while they
# shut down, and a munged that was already running belongs to someone else.
stop "$SLURM_CI_RUN_DIR/munged.pid"

# Job steps are separate processes (slurmstepd, re-parented to init); after the cancel above none should remain.
steps=$(pids_named slurmstepd | tr '\n' ' ')
[ -z "${steps// /}" ] || log "WARNING: slurmstepd processes still running: $steps (not ours to kill by name)"

if [ "${SLURM_CI_PURGE:-}" = 1 ]; then
  rm -rf "$SLURM_CI_STATE_DIR" "$SLURM_CI_LOG_DIR" "$SLURM_CI_RUN_DIR"
  log "purged $SLURM_CI_STATE_DIR $SLURM_CI_LOG_DIR $SLURM_CI_RUN_DIR"
fi
echo "SLURM DOWN"
