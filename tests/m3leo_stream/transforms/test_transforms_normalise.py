"""Normalisation per kind: standardisation and its inverse, LUT remap, phase encodings, no NaN out."""

from __future__ import annotations

import math

import torch
from transforms_cases import IGN, _stats

from m3leo_stream.modalities import REGISTRY, Modality, Registry
from m3leo_stream.transforms import build_device_transforms


def test_lut_remap():
    m = REGISTRY["esawc"]
    x = torch.zeros(1, 1, 448, 448, dtype=torch.uint8)
    x[0, 0, 0, :14] = torch.tensor(list(m.class_codes) + [0, 15, 255])
    t = build_device_transforms({}, REGISTRY, {}, inputs=[], targets=["esawc"], train=False)
    y = t({"esawc": x})["esawc"][0, 0, :14].tolist()
    assert y == list(range(11)) + [IGN, IGN, IGN]  # nodata 0 and unknown codes → ignore
    # a wide (int32) code type goes through the sorted-code search instead of a table
    wide = Registry([Modality(name="w", folder_pattern="w", file_ext="tif", bands=("c",), dtype="int32",
                              kind="categorical", resolution_m=896.0, nodata=-1, class_codes=(70000, 5, 300),
                              description="", source="")])
    t = build_device_transforms({"ignore_index": 255}, wide, {}, inputs=[], targets=["w"], train=False)
    y = t({"w": torch.tensor([300, 5, 70000, -1, 6], dtype=torch.int32).view(1, 1, 1, 5).expand(1, 1, 5, 5)})
    assert y["w"][0, 0].tolist() == [2, 1, 0, 255, 255]
    assert y["w_valid"][0, 0, 0].tolist() == [True, True, True, False, False]


def test_normalisation_inverts_and_standardises():
    g = torch.Generator().manual_seed(1)
    s1 = torch.randint(-35, 8, (3, 16, 448, 448), generator=g).to(torch.int16)
    s2 = torch.randint(1, 256, (3, 36, 448, 448), generator=g).to(torch.uint8)  # 0 is S2 nodata
    stats = _stats(REGISTRY, {"s1grd": s1.numpy(), "s2rgbm": s2.numpy()})
    cfg = {"kinds": {"sar_db": {"clip": None}}}
    t = build_device_transforms(cfg, REGISTRY, stats, inputs=["s1grd", "s2rgbm"], targets=[], train=False)
    out = t({"s1grd": s1, "s2rgbm": s2})
    for name, x in (("s1grd", s1), ("s2rgbm", s2)):
        z = out[name]
        assert z.dtype == torch.float32 and z.shape == x.shape
        assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
        phys = x.float() * torch.tensor(REGISTRY[name].scale).view(1, -1, 1, 1)
        torch.testing.assert_close(t.denormalize(name, z), phys, atol=1e-4, rtol=1e-5)
    # percentiles clip: denormalize gives the clipped physical value
    t = build_device_transforms({}, REGISTRY, stats, inputs=["s1grd"], targets=[], train=False)
    lo = torch.tensor(stats["s1grd"]["global"]["percentiles"]["1"]).view(1, -1, 1, 1)
    hi = torch.tensor(stats["s1grd"]["global"]["percentiles"]["99"]).view(1, -1, 1, 1)
    back = t.denormalize("s1grd", t({"s1grd": s1})["s1grd"])
    sc = REGISTRY["s1grd"].scale[0]  # percentiles are stored units; clips and denormalize are physical (dB)
    torch.testing.assert_close(back, torch.minimum(torch.maximum(s1.float() * sc, lo * sc), hi * sc), atol=1e-4,
                               rtol=1e-5)


def test_no_nan_reaches_the_output():
    g = torch.Generator().manual_seed(2)
    batch = {}
    for n in ("gssic", "gunw", "biomass", "modisveg", "srtmdem"):
        m = REGISTRY[n]
        c, h, w = m.shape
        if m.np_dtype.kind == "f":
            x = torch.randn(2, c, h, w, generator=g) * 2
            x[:, :, : h // 3] = float("nan")
            x[1, 0, -1, -1] = float("inf")
        else:
            x = torch.randint(0, 120, (2, c, h, w), generator=g).to(getattr(torch, m.dtype))
            x[:, :, :2] = m.nodata
        batch[n] = x
    stats = _stats(REGISTRY, {n: batch[n][:1].numpy() for n in batch})
    aug = {"resized_crop": {"p": 1.0}, "noise": {"p": 1.0, "std": 0.5}, "modality_dropout": {"p": 0.5}}
    for mode in ("sincos", "rereference"):
        t = build_device_transforms({"train": aug, "kinds": {"phase": {"mode": mode}}}, REGISTRY, stats,
                                    inputs=["gssic", "gunw"], targets=["biomass", "modisveg", "srtmdem"], train=True)
        out = t(batch, step=1)
        for k, v in out.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all(), k
        assert out["gunw"].shape[1] == len(t.channels["gunw"]) == (4 if mode == "sincos" else 3)
        assert out["biomass"].shape == (2, 2, 45, 45) and out["gssic"].shape == (2, 37, 50, 50)  # no lsmap flags
        assert 0.1 < out["biomass_valid"].float().mean() < 0.9 and out["biomass"][~out["biomass_valid"].expand(
            -1, 2, -1, -1)].eq(0).all()


def test_phase_is_encoded_not_interpolated():
    m = REGISTRY["gunw"]
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 50, 50, generator=g) * 6 - 3
    stats = _stats(REGISTRY, {"gunw": x.numpy()})
    t = build_device_transforms({"train": {"resized_crop": {"p": 1.0}, "noise": {"p": 0.0}}}, REGISTRY, stats,
                                inputs=["gunw"], targets=[], train=True)
    y = t({"gunw": x}, step=0)["gunw"]
    assert t.channels["gunw"] == ["amplitude", "coherence", "unwrappedPhase_sin", "unwrappedPhase_cos"]
    x2 = x.clone()
    x2[:, 2] += 2 * math.pi * torch.randint(-3, 4, (2, 50, 50), generator=g)  # other unwrapping, same phase
    torch.testing.assert_close(t({"gunw": x2}, step=0)["gunw"], y, atol=1e-4, rtol=0)
    t = build_device_transforms({"kinds": {"phase": {"mode": "rereference"}}}, REGISTRY, stats, inputs=["gunw"],
                                targets=[], train=False)
    x3 = x.clone()
    x3[0, 2] += 100.0  # an arbitrary per-chip reference offset is removed
    torch.testing.assert_close(t({"gunw": x3})["gunw"], t({"gunw": x})["gunw"], atol=1e-4, rtol=0)
    assert m.band_kinds[2] == "phase"
