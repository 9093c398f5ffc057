#!/usr/bin/env bash
# The main job on a fresh machine: generated M3LEO-layout data → shards → a short multi-modal MAE pretraining on the
# CPU (experiment=demo, W&B offline unless an API key is configured) → prints where the checkpoint and W&B run are.
# Extra arguments are Hydra overrides for the training run (e.g. trainer.max_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY="$PWD/.venv/bin/python"
DEMO=${M3LEO_DEMO_DIR:-demo-data}
start=$(date +%s)
if [ ! -f "$DEMO/shards/manifest.json" ]; then
  echo "[demo] generating M3LEO-layout data in $DEMO/src (2 regions × 20 chips)"
  rm -rf "$DEMO/src"
  "$PY" -m shard_tools.cli synth "$DEMO/src" --regions conus,europe --chips-per-region 20 --seed 0 --workers 2 >/dev/null
  echo "[demo] building shards in $DEMO/shards"
  "$PY" -m shard_tools.cli build "$DEMO/src" "$DEMO/shards" --workers 2 >/dev/null  # progress on stderr
fi
RUN="$DEMO/runs/demo"
if [ -f "$RUN/checkpoints/last.ckpt" ]; then
  echo "[demo] $RUN has a checkpoint: training goes on from it (rm -r $RUN to train afresh)"
fi
echo "[demo] training experiment=demo (tiny MAE, CPU; a line every 50 steps)"
"$PY" -m m3leo_stream.train experiment=demo data.root="$DEMO/shards" run_dir="$RUN" \
  trainer.enable_progress_bar=false "$@"
"$PY" -m shard_tools.cli show "$DEMO/shards" -o "$RUN/chip.png"
echo "[demo] a chip, one panel per modality: $RUN/chip.png"
echo "[demo] done in $(( $(date +%s) - start )) s"
