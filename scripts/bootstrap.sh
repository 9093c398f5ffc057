#!/usr/bin/env bash
# Set up .venv with m3leo-stream and its test tools. Idempotent; re-installs only when pyproject.toml changed.
# torch: an already installed torch is kept (GPU clusters bring their own CUDA build). Otherwise torch==2.13.0 is
# installed first (on CPU-only machines like CI's this is a local CPU build), or the spec in $M3LEO_TORCH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's output without the lines that repeat per package (its errors and what it collects still show)
quiet_pip() { sed -u -E '/^(Requirement already satisfied|  Using cached|  Downloading|  Obtaining|  Preparing|  Installing build|  Getting requirements|  Checking if build|  Building|  Created wheel|  Stored in)/d'; }
if ! python -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing ${M3LEO_TORCH:-torch==2.13.0}"
  pip install --progress-bar off "${M3LEO_TORCH:-torch==2.13.0}" 2>&1 | quiet_pip
fi
stamp=.venv/.m3leo-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing m3leo-stream and test tools into .venv"
  pip install --progress-bar off -e ".[test,hf]" 2>&1 | quiet_pip
  echo "$want" > "$stamp"
fi
