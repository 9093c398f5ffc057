"""Fixtures for the runtime library: deliberately uneven shards of tiny members."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard_tools.build import BuildConfig, build
from shard_tools.synth import SynthConfig, synth

# regions get different chip counts and a small shard size, so train shards hold from a few to ~40 samples
UNEVEN = {"conus": 100, "europe": 40, "pakin": 9, "china": 5}
UNEVEN_MODALITIES = ("modisveg", "biomass", "esawc")


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("uneven-src")
    for i, (region, n) in enumerate(UNEVEN.items()):
        synth(SynthConfig(str(src), regions=(region,), chips_per_region=n, seed=11 + i,
                          modalities=UNEVEN_MODALITIES), progress=False)
    out = tmp_path_factory.mktemp("uneven") / "shards"
    build(BuildConfig(str(src), str(out), shard_size=8_800_000, workers=1, progress=False))
    return out
