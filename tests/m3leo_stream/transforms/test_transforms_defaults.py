"""The transforms config: the YAML defaults are the code's, and Hydra-composed configs build."""

from __future__ import annotations

import pytest
import torch
import yaml
from transforms_cases import REPO, SMALL, _pattern

from m3leo_stream.transforms import DEFAULT_CONFIG, build_device_transforms


def test_default_yaml_is_the_code_default():
    doc = yaml.safe_load((REPO / "m3leo_stream/configs/transforms/default.yaml").read_text())
    assert doc == {**DEFAULT_CONFIG, "train": {**DEFAULT_CONFIG["train"],
                                               "resized_crop": {**DEFAULT_CONFIG["train"]["resized_crop"],
                                                                "ratio": doc["train"]["resized_crop"]["ratio"]}}}
    assert doc["train"]["resized_crop"]["ratio"] == pytest.approx(DEFAULT_CONFIG["train"]["resized_crop"]["ratio"])


def test_hydra_pretrain_config_builds(small_stats):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "m3leo_stream/configs/transforms"), version_base=None):
        cfg = compose(config_name="pretrain", overrides=["kinds.sar_db.clip=null"])
    t = build_device_transforms(cfg, SMALL, small_stats, inputs=["sar", "opt"], targets=[], train=True)
    assert t.channels["sar"] == ["s_vv_a", "s_vh_a", "s_vv-vh_a"]
    out = t(_pattern(4), step=0)
    assert out["sar"].shape == (4, 3, 32, 32) and out["sar_dropped"].dtype == torch.bool
