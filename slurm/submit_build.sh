#!/usr/bin/env bash
# THE one command for a shard build on Slurm: submits slurm/build_shards.sh as an array job and, depending on it
# (afterok: every array task succeeded), one job that runs `m3leo-shards finalize OUT`.
#
#   bash slurm/submit_build.sh [--tasks=N] [--log-dir=DIR] [sbatch options] SRC OUT [m3leo-shards build options]
#
#   --tasks=N         array size = number of shares (default 8: the array default in build_shards.sh)
#   --log-dir=DIR     where both jobs write their logs (default: logs, created if missing)
#   sbatch options    given as --name=value, before SRC; they apply to the array job only
#                     (e.g. --cpus-per-task=16 --mem=64G --time=8:00:00). Settings both jobs need, such as the
#                     partition or account, go in sbatch's own variables: SBATCH_PARTITION=cpu SBATCH_ACCOUNT=proj.
#   build options     passed to every `m3leo-shards build` (e.g. --shard-size 1GB --compress zstd);
#                     --storage-options is passed to finalize too.
#
# Prints "array=<job id>" and "finalize=<job id>" on stdout. If any array task fails, Slurm cancels the finalize
# job (--kill-on-invalid-dep) instead of leaving it pending forever; fix the cause and submit the same command
# again: published shards are skipped. Both jobs get the submitting shell's environment (--export=ALL), which is
# how PYTHON/PATH (the venv) and the AWS_* object-storage credentials reach them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "submit_build.sh: $*" >&2; exit 2; }

tasks=8
log_dir=logs
sbatch_args=()
while (($#)) && [[ $1 == -* ]]; do
  case $1 in
    --tasks=*) tasks=${1#*=} ;;
    --tasks) tasks=${2:?--tasks needs a value}; shift ;;
    --log-dir=*) log_dir=${1#*=} ;;
    --log-dir) log_dir=${2:?--log-dir needs a value}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*=*) sbatch_args+=("$1") ;;
    *) die "give sbatch options as --name=value (got '$1'); see --help" ;;
  esac
  shift
done
(($# >= 2)) || die "usage: submit_build.sh [--tasks=N] [sbatch options] SRC OUT [build options]; see --help"
[[ $tasks =~ ^[1-9][0-9]*$ ]] || die "--tasks must be a positive number, got '$tasks'"
SRC=$1 OUT=$2
shift 2
build_args=("$@")

# finalize needs the same storage options as the build to reach OUT
fin_args=()
for ((i = 0; i < ${#build_args[@]}; i++)); do
  case ${build_args[$i]} in
    --storage-options=*) fin_args+=("${build_args[$i]}") ;;
    --storage-options) fin_args+=(--storage-options "${build_args[$((i + 1))]:-}") ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then
  shards=("$PYTHON" -m shard_tools.cli)
elif command -v m3leo-shards >/dev/null; then
  shards=(m3leo-shards)
else
  shards=(python3 -m shard_tools.cli)
fi

mkdir -p "$log_dir"
array_id=$(sbatch --parsable --export=ALL --array="0-$((tasks - 1))" --output="$log_dir/%x-%A_%a.out" \
  "${sbatch_args[@]}" "$here/build_shards.sh" "$SRC" "$OUT" "${build_args[@]}")
array_id=${array_id%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
echo "submitted the build: array job $array_id ($tasks tasks), logs in $log_dir/" >&2

finalize_cmd=$(printf '%q ' "${shards[@]}" finalize "$OUT" --source "$SRC" "${fin_args[@]}")
fin_id=$(sbatch --parsable --export=ALL --job-name=m3leo-finalize \
  --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
  --ntasks=1 --cpus-per-task=1 --mem=4G --time=01:00:00 --output="$log_dir/%x-%j.out" \
  --wrap="set -e; echo \"[\$(date -Is)] finalize after array job $array_id\"; exec $finalize_cmd")
fin_id=${fin_id%%;*}
echo "submitted finalize: job $fin_id, runs when every task of $array_id succeeded" >&2
echo "array=$array_id"
echo "finalize=$fin_id"
