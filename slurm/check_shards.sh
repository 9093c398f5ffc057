#!/usr/bin/env bash
# Verify a finalized shard root, or recompute its stats.json, as a Slurm array job: array task i checks its
# contiguous share of the manifest's shards (streaming only the index row groups that hold them) and leaves its
# results under OUT/_build/<verify|stats>/; one dependent merge job (`--merge`) then reports (verify: whole-root
# checks plus every task's problems, exit 1 on any) or writes stats.json. submit_build.sh --verify submits both.
#
#     sbatch --array=0-7 slurm/check_shards.sh verify OUT [--workers N ...]
#     sbatch --dependency=afterany:<array id> --wrap "m3leo-shards verify OUT --merge --num-tasks 8"
#
# The program is found as in build_shards.sh (PYTHON, m3leo-shards on PATH, python3 -m shard_tools.cli).
# Memory: a verify task holds one index row group (~100 MB with all nine modalities), the rows of the shards in
# flight (2 x --workers, ~1 GB shards read through, not held) and 8 bytes a sample of the whole index for the
# duplicate check (only in the merge step): 4G is ample at any shard count. Time: a task reads its share of the
# bytes at about 0.5 GB/s per worker (sha256 + XXH3 + .npy decode): 60 TB / 64 tasks / 4 workers ~ 8 h.
# stats tasks decode every train member (~50 ms a sample per CPU): 17M samples on 64 tasks ~ 4 h.
#SBATCH --job-name=m3leo-check
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=4G
#SBATCH --time=08:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --export=ALL
set -euo pipefail

die() { echo "check_shards.sh: $*" >&2; exit 2; }
what=${1:-}
OUT=${2:-}
[[ $what == verify || $what == stats ]] && [ -n "$OUT" ] || die "usage: sbatch slurm/check_shards.sh verify|stats OUT [options]"
shift 2
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "not an array task: submit with sbatch --array"
if [ -n "${M3LEO_NUM_TASKS:-}" ]; then  # explicit count: array ids are the task indices (reruns of a few ids)
  num_tasks=$M3LEO_NUM_TASKS task_index=$SLURM_ARRAY_TASK_ID
else
  num_tasks=$SLURM_ARRAY_TASK_COUNT task_index=$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))
fi

if [ -n "${PYTHON:-}" ]; then
  shards=("$PYTHON" -m shard_tools.cli)
elif command -v m3leo-shards >/dev/null; then
  shards=(m3leo-shards)
else
  shards=(python3 -m shard_tools.cli)
fi
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}
extra=()
[ "$what" = verify ] && extra=(--workers "${SLURM_CPUS_PER_TASK:-1}")
echo "[$(date -Is)] job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname): $what task $task_index of $num_tasks"
exec "${shards[@]}" "$what" "$OUT" --num-tasks "$num_tasks" --task-index "$task_index" "${extra[@]}" "$@"
