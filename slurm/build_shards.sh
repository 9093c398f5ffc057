#!/usr/bin/env bash
# Build a shard root as a Slurm array job: array task i builds its share of the shards (shard j of the build plan
# belongs to task j % N), in parallel across nodes. Merging the shares into index.parquet, stats.json and
# manifest.json is a separate, dependent job: submit both with ONE command,
#
#     bash slurm/submit_build.sh [sbatch options] SRC OUT [m3leo-shards build options]
#
# or by hand (then finalize yourself once every task succeeded):
#
#     mkdir -p logs && sbatch slurm/build_shards.sh SRC OUT [m3leo-shards build options]
#
# SRC/OUT are local paths (on a filesystem every node sees) or fsspec URLs (s3://bucket/prefix); instead of
# arguments they may come from M3LEO_SRC / M3LEO_OUT, and extra build options from M3LEO_BUILD_ARGS.
# The program: $PYTHON -m shard_tools.cli when PYTHON is set (e.g. PYTHON=$PWD/.venv/bin/python), else
# `m3leo-shards` from PATH (an activated venv at submit time: --export=ALL carries PATH), else python3 -m ....
# Object storage: the standard AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
# AWS_PROFILE, ...) set when you submit reach the tasks through --export=ALL.
# Reruns are cheap: a task skips every shard that is already published, so resubmitting the same command after a
# failure or timeout only builds what is missing. To rerun only some task ids, keep the task count explicit:
# M3LEO_NUM_TASKS=8 sbatch --array=3,5 slurm/build_shards.sh SRC OUT.
#
# Every default below is an sbatch option; a flag on the sbatch command line overrides it
# (e.g. sbatch --array=0-31 --cpus-per-task=16 --mem=64G --partition=cpu slurm/build_shards.sh ...).
#SBATCH --job-name=m3leo-build
#   8 array tasks = 8 shares of the shards (ids must be a contiguous range, e.g. 0-7 or 0-31%8 to run 8 at a time)
#SBATCH --array=0-7
#   one process per task; it runs --workers = cpus-per-task shard builders in parallel
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#   memory per task (node memory; each worker holds about one chip's arrays plus one shard's index rows)
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#   logs/<job name>-<array job id>_<task id>.out (create logs/ first); append so a requeued task keeps its history
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#   requeue after a node failure: the build resumes at the first unpublished shard
#SBATCH --requeue
#SBATCH --export=ALL
set -euo pipefail

die() { echo "build_shards.sh: $*" >&2; exit 2; }

SRC=${1:-${M3LEO_SRC:-}}
OUT=${2:-${M3LEO_OUT:-}}
[ -n "$SRC" ] && [ -n "$OUT" ] || die "usage: sbatch slurm/build_shards.sh SRC OUT [build options] (or M3LEO_SRC/M3LEO_OUT)"
shift $(($# < 2 ? $# : 2))
extra=("$@")
if [ -n "${M3LEO_BUILD_ARGS:-}" ]; then
  read -r -a from_env <<<"$M3LEO_BUILD_ARGS"
  extra=("${from_env[@]}" "${extra[@]}")
fi

[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "not an array task: submit with sbatch (see the #SBATCH --array default)"
if [ -n "${M3LEO_NUM_TASKS:-}" ]; then
  # explicit count: array ids are the task indices themselves (for reruns of a few ids, e.g. --array=3,5)
  num_tasks=$M3LEO_NUM_TASKS
  task_index=$SLURM_ARRAY_TASK_ID
else
  # ids must form one contiguous range; --array=1-8 is as good as 0-7
  span=$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))
  [ "${SLURM_ARRAY_TASK_STEP:-1}" = 1 ] && [ "$span" = "$SLURM_ARRAY_TASK_COUNT" ] ||
    die "array ids are not one contiguous range (min $SLURM_ARRAY_TASK_MIN, max $SLURM_ARRAY_TASK_MAX," \
      "count $SLURM_ARRAY_TASK_COUNT); set M3LEO_NUM_TASKS to the full task count to run selected ids"
  num_tasks=$SLURM_ARRAY_TASK_COUNT
  task_index=$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))
fi

if [ -n "${PYTHON:-}" ]; then
  shards=("$PYTHON" -m shard_tools.cli)
elif command -v m3leo-shards >/dev/null; then
  shards=(m3leo-shards)
else
  shards=(python3 -m shard_tools.cli)
fi
# tqdm would redraw its bar 10 times a second into the log file; once a minute is plenty there
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}

echo "[$(date -Is)] job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname): task $task_index of $num_tasks," \
  "restart ${SLURM_RESTART_COUNT:-0}: ${shards[*]} build $SRC $OUT ${extra[*]}"
exec "${shards[@]}" build "$SRC" "$OUT" --num-tasks "$num_tasks" --task-index "$task_index" \
  --workers "${SLURM_CPUS_PER_TASK:-1}" "${extra[@]}"
