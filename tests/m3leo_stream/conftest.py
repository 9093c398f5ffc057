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


@pytest.fixture()
def s3_shards(s3, uneven_shards) -> str:
    """The uneven shard root copied into a fresh bucket of the test's S3 endpoint."""
    import s3fs

    bucket = s3.new_bucket()
    fs = s3fs.S3FileSystem(endpoint_url=s3.url, key="testing", secret="testing")
    fs.put(str(uneven_shards), f"{bucket}/shards", recursive=True)
    return f"s3://{bucket}/shards"


MIXED_MODALITIES = ("s2rgbm", "gssic", "gunw", "esawc")


@pytest.fixture(scope="session")
def mixed_shards(tmp_path_factory) -> Path:
    """Two regions that differ in what they have: europe has no GUNW at all (as in the release), conus lacks it for
    ~20 % of its chips and GSSIC for a few (``.skipped`` files), and S2 chips miss whole months (all-nodata bands)."""
    src = tmp_path_factory.mktemp("mixed-src")
    synth(SynthConfig(str(src), regions=("conus", "europe"), chips_per_region=12, seed=3,
                      modalities=MIXED_MODALITIES, absent={"europe": ("gunw",)}), progress=False)
    out = tmp_path_factory.mktemp("mixed") / "shards"
    build(BuildConfig(str(src), str(out), shard_size=40_000_000, workers=1, progress=False))
    return out
