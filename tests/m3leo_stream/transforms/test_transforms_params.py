"""Random parameters: RNG per rank and step (replay), modality dropout."""

from __future__ import annotations

import pytest
import torch
from transforms_cases import _pattern, _small


def test_rng_per_rank_and_replay(small_stats):
    aug = {"resized_crop": {"p": 0.5}, "noise": {"p": 1.0, "std": 0.2}, "modality_dropout": {"p": 0.3}}
    b = _pattern(8)
    r0 = _small(small_stats, aug=aug, seed=7, rank=0)
    r0b = _small(small_stats, aug=aug, seed=7, rank=0)
    r1 = _small(small_stats, aug=aug, seed=7, rank=1)
    p0, p1 = r0.sample_params(8, 3), r1.sample_params(8, 3)
    assert not torch.equal(p0["box"], p1["box"]) or not torch.equal(p0["dihedral"], p1["dihedral"])
    a, a2, c = r0(b, step=3), r0b(b, step=3), r1(b, step=3)
    for k in ("sar", "opt", "lab", "crs", "sar_valid", "sar_dropped"):
        assert torch.equal(a[k], a2[k]), k
    assert not torch.equal(a["sar"], c["sar"])
    assert not torch.equal(a["sar"], r0(b, step=4)["sar"])  # a new step draws anew
    other_seed = _small(small_stats, aug=aug, seed=8)
    assert not torch.equal(r0.sample_params(8, 3)["box"], other_seed.sample_params(8, 3)["box"])


def test_modality_dropout_and_metadata(small_stats):
    aug = {"modality_dropout": {"p": 0.9}, "noise": {"p": 0.0}}
    t = _small(small_stats, aug=aug)
    b = _pattern(32)
    out = t(b, step=0)
    ds, do = out["sar_dropped"], out["opt_dropped"]
    assert not (ds & do).any() and (ds | do).any()
    assert (out["sar"][ds] == 0).all() and (out["opt"][do] == 0).all()
    assert out["key"] is b["key"] and out["region"] is b["region"] and out["valid"] is b["valid"]
    ev = _small(small_stats, train=False)(b)
    assert "sar_dropped" not in ev and ev["crs"].shape == (32, 2, 8, 8)
    assert _small(small_stats, train=False, grid={"coarse_targets": "grid"})(b)["crs"].shape == (32, 2, 32, 32)


def test_modality_dropout_per_input(small_stats):
    t = _small(small_stats, aug={"modality_dropout": {"p": {"opt": 1.0}}, "noise": {"p": 0.0}})
    out = t(_pattern(16), step=0)
    assert out["opt_dropped"].all() and not out["sar_dropped"].any()  # always dropped / never dropped
    same = _small(small_stats, aug={"modality_dropout": {"p": {"sar": 0.9, "opt": 0.9}}, "noise": {"p": 0.0}})
    scalar = _small(small_stats, aug={"modality_dropout": {"p": 0.9}, "noise": {"p": 0.0}})
    assert torch.equal(same.sample_params(16, 5)["drop"]["sar"], scalar.sample_params(16, 5)["drop"]["sar"])
    with pytest.raises(KeyError, match="not inputs"):
        _small(small_stats, aug={"modality_dropout": {"p": {"nope": 1.0}}}).sample_params(4, 0)
