#!/usr/bin/env bash
# Fine-tuning (segmentation, regression) on a Slurm cluster: DDP on one or more nodes, one task per GPU,
# checkpoint + requeue before the time limit and resume in the same W&B run. Submit from the repository root
# (logs/ must exist: sbatch opens the log first):
#
#     mkdir -p logs
#     M3LEO_ENCODER=runs/pretrain_mae/encoder.pt sbatch slurm/finetune.sh [hydra overrides...]
#     sbatch slurm/finetune.sh experiment=reg_biomass_unet data.root=s3://bucket/m3leo-shards
#
# Experiments (m3leo_stream/configs/experiment/): finetune_esawc_from_mae (the default; model.encoder = the pretrained encoder),
# seg_esawc_unet, reg_biomass_unet, reg_ghsbuilts_unet. Every #SBATCH default below is overridden by the same flag
# on the sbatch command line. Environment variables (M3LEO_EXPERIMENT, M3LEO_DATA_ROOT, M3LEO_RUN_DIR,
# M3LEO_ENCODER, M3LEO_OVERRIDES, PYTHON, NCCL_*, ...) are read by slurm/_launch.sh, which documents them;
# README "Running on a cluster" has the whole story.
#SBATCH --job-name=m3leo-finetune
#   nodes x tasks per node = DDP world size; one task per GPU (Lightning: trainer.devices = tasks per node)
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#   CPU cores per task: the loader's workers (data.num_workers) run on these
#SBATCH --cpus-per-task=8
#   all of each node's memory (the job holds all its GPUs); on shared nodes give an amount, e.g. --mem=200G
#SBATCH --mem=0
#SBATCH --time=12:00:00
#   SIGUSR1 to the tasks 300 s before the time limit (Slurm checks every 30 s, so 300-330 s before): the training
#   saves a checkpoint and requeues the job; the restarted job resumes from it. --time must exceed 330 s plus the
#   start-up time, or the signal arrives before the handler is installed. B:USR1@N works too (relayed by the script).
#SBATCH --signal=USR1@300
#SBATCH --requeue
#   logs/<job name>-<job id>.out; the requeued run appends to the same file
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --export=ALL
set -euo pipefail
M3LEO_DEFAULT_EXPERIMENT=finetune_esawc_from_mae
M3LEO_JOB_KIND=finetune

# Find slurm/_launch.sh: inside a job $0 is Slurm's copy of this script, so use the submitted path from the job
# record (M3LEO_SLURM_DIR overrides; the submit directory's slurm/ is the last resort).
m3_dir=${M3LEO_SLURM_DIR:-$(dirname "$0")}
if [ ! -f "$m3_dir/_launch.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  m3_cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)
  m3_dir=$(dirname "${m3_cmd%% *}")
fi
[ -f "$m3_dir/_launch.sh" ] || m3_dir=${SLURM_SUBMIT_DIR:-.}/slurm
# shellcheck source=slurm/_launch.sh
. "$m3_dir/_launch.sh"
