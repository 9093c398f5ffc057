# Common launcher of slurm/pretrain.sh and slurm/finetune.sh (sourced by them inside the batch job, not run
# directly). It turns environment variables and arguments into Hydra overrides, sets the NCCL/threads defaults,
# starts one training process per task with `srun` (Lightning's SLURMEnvironment reads the ranks, the node list
# and the job id from Slurm), and relays a USR1 sent to the batch shell only (sbatch --signal=B:USR1@N,
# scancel --batch --signal=USR1) to the tasks: on USR1 the training checkpoints and requeues the job, and the
# requeued job resumes from that checkpoint (resume=auto) in the same W&B run.
#
# Inputs (the calling script sets M3LEO_DEFAULT_EXPERIMENT and M3LEO_JOB_KIND first):
#   arguments              Hydra overrides, e.g. data.batch_size=32 trainer.max_steps=100000 experiment=demo
#   M3LEO_EXPERIMENT       experiment config (m3leo_stream/configs/experiment/<name>.yaml); an experiment=... argument wins
#   M3LEO_DATA_ROOT        shard root, local path or URL (s3://bucket/prefix)         -> data.root=...
#   M3LEO_RUN_DIR          where checkpoints/config/W&B files go (default runs/<experiment> under the submit
#                          directory)                                                 -> run_dir=...
#   M3LEO_ENCODER          fine-tuning: pretrained encoder, encoder.pt or .ckpt path/URL -> model.encoder=...
#   M3LEO_OVERRIDES        more overrides, whitespace-separated (use arguments for values with spaces)
#   PYTHON                 interpreter of the environment that has m3leo-stream (default: python3 on PATH)
#   M3LEO_SRUN_ARGS        extra srun options, whitespace-separated
#   M3LEO_GPU_BIND         srun --gpu-bind value when the job has GPUs (default none: every task of a node sees
#                          all of the node's GPUs and Lightning picks cuda:<local rank>)
# Added unless given as an override: trainer.num_nodes (the job's nodes), trainer.devices (tasks per node; Lightning
# requires one task per device), resume=auto and trainer.enable_progress_bar=false.

set -euo pipefail

_m3_log() { echo "[$(date -Is)] ${M3LEO_JOB_KIND:-m3leo}: $*"; }
_m3_die() { echo "${M3LEO_JOB_KIND:-m3leo}: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || _m3_die "not inside a Slurm job: submit with sbatch (see the script's header)"

# ------------------------------------------------------------------ Hydra overrides
m3_overrides=()
m3_has() {  # m3_has KEY: an override of KEY (KEY=..., +KEY=..., ++KEY=..., ~KEY) is already present
  local o
  for o in "${m3_overrides[@]}" "${m3_user[@]}"; do
    o=${o#++}; o=${o#+}; o=${o#\~}
    [[ $o == "$1="* || $o == "$1" ]] && return 0
  done
  return 1
}
m3_user=("$@")
if [ -n "${M3LEO_OVERRIDES:-}" ]; then
  read -r -a _m3_env_ovr <<<"$M3LEO_OVERRIDES"
  m3_user=("${_m3_env_ovr[@]}" "${m3_user[@]}")  # arguments last: they win over the variable
fi
m3_has experiment || m3_overrides+=("experiment=${M3LEO_EXPERIMENT:-$M3LEO_DEFAULT_EXPERIMENT}")
[ -z "${M3LEO_DATA_ROOT:-}" ] || m3_has data.root || m3_overrides+=("data.root=$M3LEO_DATA_ROOT")
[ -z "${M3LEO_RUN_DIR:-}" ] || m3_has run_dir || m3_overrides+=("run_dir=$M3LEO_RUN_DIR")
[ -z "${M3LEO_ENCODER:-}" ] || m3_has model.encoder || m3_overrides+=("model.encoder=$M3LEO_ENCODER")

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
per_node=${SLURM_NTASKS_PER_NODE:-}
if [ -z "$per_node" ]; then  # e.g. sbatch --ntasks=8: SLURM_TASKS_PER_NODE is "4(x2)" or "4,3"
  per_node=${SLURM_TASKS_PER_NODE%%[(,]*}
  [ "$SLURM_TASKS_PER_NODE" = "$per_node" ] || [[ $SLURM_TASKS_PER_NODE == "$per_node(x$nodes)" ]] ||
    _m3_die "uneven tasks per node ($SLURM_TASKS_PER_NODE): submit with --ntasks-per-node, one task per GPU"
fi
m3_has trainer.num_nodes || m3_overrides+=("trainer.num_nodes=$nodes")
m3_has trainer.devices || m3_overrides+=("trainer.devices=$per_node")
m3_has resume || m3_overrides+=("resume=auto")
# a progress bar redrawn into a log file is noise; the losses and speeds go to W&B and the log lines
m3_has trainer.enable_progress_bar || m3_overrides+=("trainer.enable_progress_bar=false")
m3_overrides+=("${m3_user[@]}")

# ------------------------------------------------------------------ environment of the tasks
# NCCL: log warnings only; a failed rank aborts the collective instead of hanging until the timeout. Set any
# NCCL_* before sbatch to change them (e.g. NCCL_SOCKET_IFNAME=ib0, NCCL_DEBUG=INFO, NCCL_IB_DISABLE=1).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# One OpenMP thread per rank, as torchrun does: the loader workers (data.num_workers) do the CPU work.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
# tqdm would redraw its bar ten times a second into the log file
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}

PY=${PYTHON:-python3}
srun_args=(--kill-on-bad-exit=1)
if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9] ]]; then
  srun_args+=("--gpu-bind=${M3LEO_GPU_BIND:-none}")
fi
if [ -n "${M3LEO_SRUN_ARGS:-}" ]; then
  read -r -a _m3_srun_extra <<<"$M3LEO_SRUN_ARGS"
  srun_args+=("${_m3_srun_extra[@]}")
fi

_m3_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) [${SLURM_JOB_NODELIST:-?}]," \
  "$per_node task(s) per node, in $(pwd)"
_m3_log "srun ${srun_args[*]} $PY -m m3leo_stream.train ${m3_overrides[*]}"

# ------------------------------------------------------------------ run, relaying USR1/TERM to the tasks
# srun runs in the background so that this shell can run its traps while it waits: bash runs a trap only between
# commands, never during a foreground srun. srun relays the signal it receives to every task.
srun "${srun_args[@]}" "$PY" -m m3leo_stream.train "${m3_overrides[@]}" &
m3_srun=$!
_m3_forward() {
  _m3_log "batch shell got SIG$1: relaying it to the tasks (srun pid $m3_srun)"
  kill -"$1" "$m3_srun" 2>/dev/null || true
}
trap '_m3_forward USR1' USR1
trap '_m3_forward TERM' TERM
status=0
while :; do
  wait "$m3_srun" && status=0 || status=$?
  kill -0 "$m3_srun" 2>/dev/null || break  # gone: $status is srun's; alive: a trap interrupted the wait
done
trap - USR1 TERM
_m3_log "srun exited with status $status"
exit "$status"
