"""A regression target takes its standardisation from stats.json; a root without the target's statistics is an
error naming them, not a silent mean 0 / std 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from m3leo_stream import shard_format as sf
from m3leo_stream.train import CONFIG_DIR, build_datamodule, describe_data
from shard_tools.build import BuildConfig, build
from shard_tools.synth import SynthConfig, synth


@pytest.fixture(scope="module")
def biomass_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("target-stats")
    synth(SynthConfig(str(base / "src"), ("conus", "europe"), 5, seed=5, modalities=("s2rgbm", "biomass")),
          progress=False)
    build(BuildConfig(str(base / "src"), str(base / "root"), workers=1, progress=False))
    return base / "root"


def _info(root: Path):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=reg_biomass_unet", f"data.root={root}", "data.num_workers=0",
                                "data.inputs=[s2rgbm]", "transforms.grid.size=32"])
    return describe_data(cfg, build_datamodule(cfg))[0]


def test_the_target_is_standardised_by_its_statistics(biomass_root):
    info = _info(biomass_root)
    stats = json.loads((biomass_root / sf.STATS).read_text())["biomass"]
    scale = info.target_mean[0] / stats["global"]["mean"][0]
    assert info.target_bands == ["agb"] and scale > 0
    assert info.target_std[0] == pytest.approx(stats["global"]["std"][0] * scale)


@pytest.mark.parametrize("drop", ["modality", "mean"])
def test_a_target_without_statistics_is_an_error_naming_them(biomass_root, tmp_path, drop):
    root = tmp_path / "root"
    shutil.copytree(biomass_root, root)
    stats = json.loads((root / sf.STATS).read_text())
    if drop == "modality":
        del stats["biomass"]
    else:
        del stats["biomass"]["global"]["mean"]
    (root / sf.STATS).write_text(json.dumps(stats))
    with pytest.raises(sf.StatsError, match=f"{root}/stats.json has no mean for band 'agb' of modality 'biomass'.*"
                                            "m3leo-shards stats ROOT"):
        _info(root)
