#!/usr/bin/env bash
# THE one command for a shard build on Slurm: submits one plan job (`m3leo-shards plan`: lists and sizes the
# source once, writes OUT/_build/plan.json + two Parquet tables laid out for N tasks; reused without listing when
# the source is unchanged), slurm/build_shards.sh as an array job depending on it (each task reads only its share
# of the plan and touches only its shards' files), and one job that runs `m3leo-shards finalize OUT` (streaming,
# bounded memory) once every array task succeeded (afterok). With --verify, also a verify array
# (slurm/check_shards.sh) after finalize and its merge job, which reports and fails on any problem.
#
#   bash slurm/submit_build.sh [--tasks=N] [--verify[=M]] [--log-dir=DIR] [sbatch options] SRC OUT [build options]
#
#   --tasks=N         array size = number of shares (default 8: the array default in build_shards.sh)
#   --verify[=M]      verify the finalized root with M array tasks (default: N) and a merge job
#   --plan-mem=SIZE   memory of the plan job (default 4G; about 0.5 KB a source file: 16G for 25M files)
#   --log-dir=DIR     where the jobs write their logs (default: logs, created if missing)
#   sbatch options    given as --name=value, before SRC; they apply to the array job only
#                     (e.g. --cpus-per-task=16 --mem=64G --time=8:00:00). Settings both jobs need, such as the
#                     partition or account, go in sbatch's own variables: SBATCH_PARTITION=cpu SBATCH_ACCOUNT=proj.
#   build options     passed to every `m3leo-shards build` (e.g. --shard-size 1GB --compress zstd);
#                     --storage-options is passed to finalize too.
#
# Resources: where OUT already holds a plan (a rerun, or `m3leo-shards plan` run before), the array job's --mem and
# --time default to the plan's hints (`resources` in plan.json: --mem = workers x per-worker memory, --time = the
# largest task's bytes at 20 MB/s per worker, x2), finalize's and the verify merge's --mem/--time to finalize's
# (2 GB + 16 bytes a sample; an hour per 10k shards) and the verify tasks' to verify's (2 GB + 16 bytes a sample;
# all bytes at 0.5 GB/s per CPU over M tasks, x2); sbatch options given here override the array's. Without a
# plan, build_shards.sh's and check_shards.sh's #SBATCH defaults apply (finalize: 4G, 1 h). The verify tasks get
# the array's --cpus-per-task when it is given (one reader thread each), else check_shards.sh's 4.
# Prints "plan=<job id>", "array=<job id>" and "finalize=<job id>" (and "verify=", "verify_merge=") on stdout. If any array task fails, Slurm cancels the finalize
# job (--kill-on-invalid-dep) instead of leaving it pending forever; fix the cause and submit the same command
# again: published shards are skipped. Both jobs get the submitting shell's environment (--export=ALL), which is
# how PYTHON/PATH (the venv) and the AWS_* object-storage credentials reach them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "submit_build.sh: $*" >&2; exit 2; }

tasks=8
log_dir=logs
verify=0
plan_mem=4G
sbatch_args=()
while (($#)) && [[ $1 == -* ]]; do
  case $1 in
    --verify) verify=-1 ;;
    --verify=*) verify=${1#*=} ;;
    --plan-mem=*) plan_mem=${1#*=} ;;
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

[ "$verify" = -1 ] && verify=$tasks
[[ $verify =~ ^[0-9]+$ ]] || die "--verify must be a number of tasks, got '$verify'"

# resource defaults from an existing plan's hints (the user's sbatch options win: they come later)
given() { local o; for o in "${sbatch_args[@]}"; do [[ $o == --$1=* ]] && return 0; done; return 1; }
array_res=() fin_res=(--mem=4G --time=01:00:00) ver_res=()
cpus=8
for o in "${sbatch_args[@]}"; do [[ $o == --cpus-per-task=* ]] && cpus=${o#*=}; done
# the verify array runs one reader thread per CPU: as many as the build array's tasks get, when given
given cpus-per-task && ver_res+=("--cpus-per-task=$cpus")
ver_tasks=$verify
[ "$ver_tasks" = -1 ] && ver_tasks=$tasks
if hints=$("${PYTHON:-python3}" - "$OUT" "$cpus" "$ver_tasks" 2>/dev/null <<'PY'
import json, math, sys
try:
    import fsspec
    with fsspec.open(sys.argv[1].rstrip("/") + "/_build/plan.json", "rb") as f:
        r = json.load(f)["resources"]
except Exception:
    sys.exit(1)
workers = int(sys.argv[2])
mem = math.ceil(max(4, workers * r["build_mem_per_worker_gib"]))
hours = max(1, math.ceil(2 * r["build_hours_one_worker"] / workers))
fin_hours = max(1, math.ceil(r.get("shards", 0) / 10000))
# verify reads every byte at ~0.5 GB/s per worker thread (sha256 + XXH3 + .npy decode); x2 margin
ver_tasks = max(1, int(sys.argv[3]))
total = r.get("total_bytes", r["largest_task_bytes"])
ver_hours = max(1, math.ceil(2 * total / (ver_tasks * workers * 0.5e9) / 3600))
print(f"--mem={mem}G --time={hours}:00:00 --mem={math.ceil(r['finalize_mem_gib'])}G --time={fin_hours}:00:00 "
      f"--mem={math.ceil(r['verify_mem_gib'])}G --time={ver_hours}:00:00")
PY
); then
  read -r m t fm ft vm vt <<<"$hints"
  given mem || array_res+=("$m")
  given time || array_res+=("$t")
  fin_res=("$fm" "$ft")
  ver_res+=("$vm" "$vt")
  echo "resources from the existing plan: array $m $t, finalize $fm $ft, verify tasks $vm $vt" >&2
fi

mkdir -p "$log_dir"
plan_cmd=$(printf '%q ' "${shards[@]}" plan "$SRC" "$OUT" --num-tasks "$tasks" "${build_args[@]}")
plan_id=$(sbatch --parsable --export=ALL --job-name=m3leo-plan \
  --ntasks=1 --cpus-per-task=1 --mem="$plan_mem" --time=12:00:00 --output="$log_dir/%x-%j.out" \
  --wrap="set -e; echo \"[\$(date -Is)] plan for $tasks tasks\"; exec $plan_cmd")
plan_id=${plan_id%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
echo "submitted the plan: job $plan_id" >&2

array_id=$(sbatch --parsable --export=ALL --array="0-$((tasks - 1))" --output="$log_dir/%x-%A_%a.out" \
  --dependency="afterok:$plan_id" --kill-on-invalid-dep=yes \
  "${array_res[@]}" "${sbatch_args[@]}" "$here/build_shards.sh" "$SRC" "$OUT" "${build_args[@]}")
array_id=${array_id%%;*}
echo "submitted the build: array job $array_id ($tasks tasks), logs in $log_dir/" >&2

finalize_cmd=$(printf '%q ' "${shards[@]}" finalize "$OUT" --source "$SRC" "${fin_args[@]}")
fin_id=$(sbatch --parsable --export=ALL --job-name=m3leo-finalize \
  --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
  --ntasks=1 --cpus-per-task=1 "${fin_res[@]}" --output="$log_dir/%x-%j.out" \
  --wrap="set -e; echo \"[\$(date -Is)] finalize after array job $array_id\"; exec $finalize_cmd")
fin_id=${fin_id%%;*}
echo "submitted finalize: job $fin_id, runs when every task of $array_id succeeded" >&2
echo "plan=$plan_id"
echo "array=$array_id"
echo "finalize=$fin_id"

if ((verify > 0)); then
  ver_id=$(sbatch --parsable --export=ALL --array="0-$((verify - 1))" --output="$log_dir/%x-%A_%a.out" \
    --dependency="afterok:$fin_id" --kill-on-invalid-dep=yes "${ver_res[@]}" \
    "$here/check_shards.sh" verify "$OUT" "${fin_args[@]}")
  ver_id=${ver_id%%;*}
  merge_cmd=$(printf '%q ' "${shards[@]}" verify "$OUT" --merge --num-tasks "$verify" "${fin_args[@]}")
  merge_id=$(sbatch --parsable --export=ALL --job-name=m3leo-verify-merge \
    --dependency="afterany:$ver_id" --kill-on-invalid-dep=yes \
    --ntasks=1 --cpus-per-task=1 "${fin_res[@]}" --output="$log_dir/%x-%j.out" \
    --wrap="set -e; echo \"[\$(date -Is)] verify merge after array job $ver_id\"; exec $merge_cmd")
  merge_id=${merge_id%%;*}
  echo "submitted verify: array job $ver_id ($verify tasks) and its merge $merge_id (fails on any problem)" >&2
  echo "verify=$ver_id"
  echo "verify_merge=$merge_id"
fi
