"""Band plans: band selection (names, patterns, what the loader reads), VV−VH ratio channels, stats lookups."""

from __future__ import annotations

import math

import pytest
import torch
from transforms_cases import MIXED, SMALL, _mixed_batch, _pattern, _small, _stats

from m3leo_stream.modalities import REGISTRY
from m3leo_stream.transforms import build_device_transforms


@pytest.mark.parametrize("clip", [{"*_vv_*": [0, 20]}, {"vv": [0, 20]}])  # fnmatch pattern or band-name token
def test_band_selection_and_ratio(small_stats, clip):
    s = small_stats["sar"]["global"]
    t = _small(small_stats, train=False, modalities={"sar": {"ratio": True, "clip": clip}})
    assert t.channels["sar"] == ["s_vv_a", "s_vh_a", "s_vv-vh_a"]
    b = _pattern(2, nodata_block=False)
    out = t(b)["sar"]
    vv = b["sar"][:, 0].float().clamp(0, 20)
    vh = b["sar"][:, 1].float()
    want = (vv - vh - (s["mean"][0] - s["mean"][1])) / math.hypot(s["std"][0], s["std"][1])
    torch.testing.assert_close(out[:, 2], want, atol=1e-4, rtol=1e-5)
    # names and patterns select bands; they come out in storage order
    cfg = {"modalities": {"s1grd": {"bands": ["summer_*", "winter_vv_asc"], "mean": 0.0, "std": 1.0,
                                    "clip": None}}}
    t = build_device_transforms(cfg, REGISTRY, {}, inputs=["s1grd"], targets=[], train=False)
    assert t.channels["s1grd"] == ["winter_vv_asc", "summer_vv_asc", "summer_vv_des", "summer_vh_asc",
                                   "summer_vh_des"]
    x = torch.arange(16, dtype=torch.int16).view(1, 16, 1, 1).expand(1, 16, 448, 448)
    got = t({"s1grd": x})["s1grd"][0, :, 0, 0].tolist()  # physical dB: stored 0.01 dB units
    assert got == pytest.approx([0.0, 0.08, 0.09, 0.10, 0.11], abs=1e-6)


def test_missing_stats_and_unknown_band_are_named(small_stats):
    with pytest.raises(KeyError, match="band pattern 'nope' matches no band of modality 'sar'"):
        _small(small_stats, modalities={"sar": {"bands": ["nope"]}})
    with pytest.raises(KeyError, match="no mean for band 'r' of modality 'opt'"):
        build_device_transforms({}, SMALL, {}, inputs=["opt"], targets=[], train=False)
    t = _small(small_stats)
    b = _pattern(2)
    del b["opt"]
    with pytest.raises(KeyError, match="no input 'opt'"):
        t(b, step=0)


def test_bands_needed_is_what_the_transforms_read():
    from m3leo_stream.transforms import bands_needed

    cfg = {"modalities": {"s1grd": {"bands": ["summer_*"]}, "s2rgbm": {"bands": ["07_*"]}}}
    got = bands_needed(cfg, REGISTRY, inputs=["s1grd", "s2rgbm", "gssic"], targets=["esawc", "biomass"])
    assert got == {"s1grd": [8, 9, 10, 11], "s2rgbm": [18, 19, 20], "gssic": list(range(37)), "esawc": [0],
                   "biomass": [0, 1]}  # gssic: every band but the categorical geometry_lsmap flag band
    assert REGISTRY["gssic"].bands[37] == "geometry_lsmap"
    assert bands_needed(None, REGISTRY, inputs=["s1grd"]) == {"s1grd": list(range(16))}
    s1 = {"bands": ["summer_*"], "mean": 0.0, "std": 1.0, "clip": None}  # no stats needed
    t = build_device_transforms({"modalities": {"s1grd": s1}}, REGISTRY, {}, inputs=["s1grd"], targets=["esawc"],
                                train=False)
    assert {n: p.bands for n, p in {**t.inputs, **t.targets}.items()} == {"s1grd": [8, 9, 10, 11], "esawc": [0]}
    with pytest.raises(KeyError, match="band pattern 'nope'"):
        bands_needed({"modalities": {"s2rgbm": {"bands": ["nope"]}}}, REGISTRY, inputs=["s2rgbm"])


@pytest.mark.parametrize("train", [True, False])
def test_selected_band_batches_give_bit_identical_outputs(train):
    """The same transforms on a batch carrying all bands and on one carrying exactly its selected bands (what the
    loader reads, named by ``batch["bands"]``): every output bit-identical, through crops, flips, noise, dropout."""
    from m3leo_stream.transforms import bands_needed

    full = _mixed_batch(6)
    stats = _stats(MIXED, {n: full[n].numpy() for n in ("sar", "opt", "lab", "crs", "gssic")})
    cfg = {"kinds": {"sar_db": {"clip": None}}, "modalities": {"opt": {"bands": ["r", "b"]}, "sar": {"bands": "*vh*"},
                                                               "crs": {"bands": ["c"]}},
           "train": {"resized_crop": {"p": 0.7}, "noise": {"p": 1.0, "std": 0.3}, "modality_dropout": {"p": 0.3}}}
    inputs, targets = ["sar", "opt", "gssic"], ["lab", "crs"]
    sel = bands_needed(cfg, MIXED, inputs=inputs, targets=targets)
    assert sel == {"sar": [1], "opt": [0, 2], "gssic": list(range(37)), "lab": [0], "crs": [1]}
    part = {**full, **{n: full[n][:, idx].clone() for n, idx in sel.items()},
            "bands": {n: [MIXED[n].bands[i] for i in idx] for n, idx in sel.items()}}
    labelled = {**full, "bands": {n: list(MIXED[n].bands) for n in sel}}  # all bands, named
    t = build_device_transforms(cfg, MIXED, stats, inputs=inputs, targets=targets, train=train, seed=3)
    for step in (0, 1):
        want = t(full, step=step)
        for other in (part, labelled):
            got = t(other, step=step)
            assert set(got) == set(want) and "bands" not in got
            for k, v in want.items():
                if torch.is_tensor(v):
                    assert v.dtype == got[k].dtype and v.shape == got[k].shape, k
                    assert v.numpy().tobytes() == got[k].numpy().tobytes(), k  # bit for bit
                else:
                    assert got[k] == v, k
    y, valid = t.normalize_input("opt", part["opt"], bands=["r", "b"])
    torch.testing.assert_close(y, t.normalize_input("opt", full["opt"])[0], atol=0, rtol=0)


def test_band_names_must_match_the_selection(small_stats):
    t = _small(small_stats, train=False, modalities={"opt": {"bands": ["r", "b"]}})
    b = _pattern(2)
    rb = b["opt"][:, [0, 2]]
    with pytest.raises(ValueError, match=r"'opt' has shape \(2, 2, 32, 32\); expected \(B, 3, H, W\) \(all bands\)"):
        t({**b, "opt": rb})  # selected bands without their names
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        t({**b, "opt": b["opt"][:, [0, 1]], "bands": {"opt": ["r", "g"]}})  # another selection than the config's
    with pytest.raises(ValueError, match="has 2 bands .* names 3"):
        t({**b, "opt": rb, "bands": {"opt": ["r", "g", "b"]}})
    with pytest.raises(ValueError, match=r"distinct bands of the modality in storage order; got \['b', 'r'\]"):
        t({**b, "opt": rb, "bands": {"opt": ["b", "r"]}})
    with pytest.raises(ValueError, match=r"unknown: \['nir'\]"):
        t({**b, "opt": rb, "bands": {"opt": ["r", "nir"]}})
    # a superset of the selection in storage order is fine: the transforms pick theirs
    out = t({**b, "bands": {"opt": ["r", "g", "b"]}})
    assert torch.equal(out["opt"], t(b)["opt"])


def test_ratio_channels_follow_the_registry_pairs():
    """The VV − VH channels come from the modality's declared polarisation pairs, whatever the band names."""
    from m3leo_stream.modalities import Modality, Registry

    reg = Registry([Modality(name="sar", folder_pattern="sar", file_ext="tif", bands=("hh", "co", "cross"),
                             dtype="int16", kind="sar_db", resolution_m=140.0, nodata=-32768,
                             polarisation_pairs=(("co", "cross"),), description="", source="")])
    x = torch.stack([torch.full((32, 32), v, dtype=torch.int16) for v in (1, 500, 200)])[None]
    cfg = {"modalities": {"sar": {"ratio": True, "clip": None, "mean": 0.0, "std": 1.0}}}
    t = build_device_transforms(cfg, reg, {}, inputs=["sar"], targets=[], train=False)
    assert t.channels["sar"] == ["hh", "co", "cross", "co-cross"] and t.inputs["sar"].ratio_pairs == [(1, 2)]
    out = t({"sar": x})["sar"][0, :, 0, 0]
    assert out.tolist() == pytest.approx([1.0, 500.0, 200.0, 300.0 / math.sqrt(2)])
    with pytest.raises(ValueError, match="ratio requested for 'sar' but no selected band has both a VV and a VH"):
        build_device_transforms({"modalities": {"sar": {**cfg["modalities"]["sar"], "bands": ["hh", "co"]}}}, reg,
                                {}, inputs=["sar"], targets=[], train=False)
