#!/usr/bin/env bash
# The test command: sets up .venv, lints and type-checks the tree (ruff, mypy), starts the services the tests need,
# runs pytest. Extra args go to pytest.
# Under CI=true (or M3LEO_START_SLURM=1) it installs and starts a single-machine Slurm cluster on loopback and
# stops exactly what it started afterwards; the S3 endpoint (moto_server) is started by the test fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PYTHON="$PWD/.venv/bin/python"
started_slurm=0
if [ "${CI:-}" = "true" ] || [ "${M3LEO_START_SLURM:-}" = "1" ]; then
  if [ -f ci/slurm-up.sh ]; then
    bash ci/slurm-up.sh && started_slurm=1
  fi
fi
cleanup() { if [ "$started_slurm" = 1 ]; then bash ci/slurm-down.sh || true; fi; }
trap cleanup EXIT
"$PYTHON" -m ruff check --quiet .  # lint first: one finding fails the test command
"$PYTHON" -m mypy  # type-check m3leo_stream and shard_tools ([tool.mypy] in pyproject.toml): one error fails it
"$PYTHON" -m pytest -q tests "$@"
