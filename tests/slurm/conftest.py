"""Tiny data shared by the Slurm tests: 2 regions x 6 chips of synthetic source, and its single-process build."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_support import TINY_SHARD_SIZE as SHARD_SIZE  # noqa: E402
from slurm_support import require_slurm  # noqa: E402


@pytest.fixture(scope="session")
def slurm() -> None:
    """A cluster that runs jobs (fails under CI=true, skips elsewhere); list it first so that no data is built
    for a test that cannot run."""
    require_slurm()


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    from shard_tools.synth import SynthConfig, synth

    out = tmp_path_factory.mktemp("slurm-synth") / "src"
    synth(SynthConfig(str(out), ("conus", "europe"), 6, seed=3), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_src) -> Path:
    from shard_tools.build import BuildConfig, build, parse_size

    out = tmp_path_factory.mktemp("slurm-shards") / "root"
    build(BuildConfig(str(tiny_src), str(out), shard_size=parse_size(SHARD_SIZE), workers=1, progress=False))
    return out
