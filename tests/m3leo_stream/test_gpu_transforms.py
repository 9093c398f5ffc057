"""Device transforms: normalisation per kind, LUT remap, joint geometry, masks, RNG per rank, CPU vs CUDA."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from m3leo_stream.gpu_transforms import DEFAULT_CONFIG, build_device_transforms, dihedral
from m3leo_stream.modalities import REGISTRY, Modality, Registry
from shard_tools.stats import StatsSet

REPO = Path(__file__).resolve().parents[2]
IGN = -100

# Small modalities (32 px and 8 px chips) so that index-encoded patterns stay cheap and exact.
SMALL = Registry([
    Modality(name="sar", folder_pattern="sar", file_ext="tif", bands=("s_vv_a", "s_vh_a"), dtype="int16",
             kind="sar_db", resolution_m=140.0, nodata=-32768, description="", source=""),
    Modality(name="opt", folder_pattern="opt", file_ext="tif", bands=("r", "g", "b"), dtype="uint8",
             kind="optical", resolution_m=140.0, scale=(1 / 255,) * 3, description="", source=""),
    Modality(name="lab", folder_pattern="lab", file_ext="tif", bands=("code",), dtype="int16", kind="categorical",
             resolution_m=140.0, nodata=0, class_codes=tuple(range(1, 1025)), description="", source=""),
    Modality(name="crs", folder_pattern="crs", file_ext="tif", bands=("r", "c"), dtype="float32", kind="continuous",
             resolution_m=560.0, nodata=float("nan"), description="", source=""),
])
NO_AUG = {"dihedral": False, "resized_crop": {"p": 0.0}, "noise": {"p": 0.0}, "modality_dropout": {"p": 0.0}}


def _stats(registry, arrays: dict[str, np.ndarray]) -> dict:
    """stats.json content built by the shard builder's own statistics code from (N, C, H, W) arrays."""
    s = StatsSet([registry[n] for n in arrays])
    for n, a in arrays.items():
        for chip in a:
            s.add("r0", n, chip)
    return s.to_json()


def _pattern(b: int, nodata_block: bool = True) -> dict[str, torch.Tensor]:
    """Index-encoded small batch: sar = (row, col) + 100·sample, lab code = row·32 + col + 1, crs = coarse (row, col).
    A nodata block sits at the same place in every modality."""
    r, c = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    sar = torch.stack([r, c]).expand(b, 2, 32, 32).clone().to(torch.int16)
    sar += (100 * torch.arange(b, dtype=torch.int16)).view(b, 1, 1, 1)
    lab = (r * 32 + c + 1).expand(b, 1, 32, 32).clone().to(torch.int16)
    rc, cc = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    crs = torch.stack([rc, cc]).float().expand(b, 2, 8, 8).clone()
    opt = torch.randint(0, 256, (b, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    if nodata_block:
        sar[:, :, 4:8, 20:28] = -32768
        lab[:, :, 4:8, 20:28] = 0
        crs[:, :, 1:2, 5:7] = float("nan")
    return {"sar": sar, "opt": opt, "lab": lab, "crs": crs, "key": [f"k{i}" for i in range(b)],
            "region": torch.zeros(b, dtype=torch.long), "valid": torch.ones(b, dtype=torch.bool)}


@pytest.fixture(scope="module")
def small_stats():
    b = _pattern(4)
    return _stats(SMALL, {n: b[n].numpy() for n in ("sar", "opt", "lab", "crs")})


def _small(stats, train=True, aug=None, seed=0, rank=0, **over):
    cfg = {"kinds": {"sar_db": {"clip": None}}, "train": aug or {}, **over}
    return build_device_transforms(cfg, SMALL, stats, inputs=["sar", "opt"], targets=["lab", "crs"], train=train,
                                   seed=seed, rank=rank)


def _element(out: torch.Tensor, ref: torch.Tensor) -> int:
    """The dihedral element taking ``ref`` (H, W) to ``out``; fails when there is none."""
    for k in range(8):
        if torch.equal(dihedral(ref[None], torch.tensor([k]))[0], out):
            return k
    raise AssertionError("output is not a dihedral image of the input")


# --------------------------------------------------------------------------------------------------------------


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


def test_dihedral_moves_every_modality_and_mask_the_same(small_stats):
    t = _small(small_stats, aug={"dihedral": True, "resized_crop": {"p": 0.0}, "noise": {"p": 0.0}})
    batch = _pattern(16)
    out = t(batch, step=5)
    seen = set()
    for i in range(16):
        ref_lab = batch["lab"][i, 0].long() - 1
        ref_lab[batch["lab"][i, 0] == 0] = IGN
        k = _element(out["lab"][i], ref_lab)
        seen.add(k)
        d = torch.tensor([k])
        # same geometry for the coarse target (own 8 px grid), the input pattern and every mask
        assert torch.equal(out["crs"][i], dihedral(torch.nan_to_num(batch["crs"][i:i + 1], 0.0), d)[0])
        sar = t.denormalize("sar", out["sar"][i]).round().long()
        want = dihedral(batch["sar"][i:i + 1].long(), d)[0]
        ok = out["sar_valid"][i, 0]
        assert torch.equal(sar[:, ok], want[:, ok])
        assert torch.equal(out["sar_valid"][i], out["lab_valid"][i])
        assert torch.equal(out["crs_valid"][i], dihedral(~torch.isnan(batch["crs"][i:i + 1]).all(1, True), d)[0])
        assert torch.equal(out["opt_valid"][i], torch.ones(1, 32, 32, dtype=torch.bool))
    assert len(seen) >= 4  # the parameters really vary per sample


def test_resized_crop_is_joint_and_keeps_labels_exact(small_stats):
    aug = {"dihedral": True, "resized_crop": {"p": 1.0, "scale": [0.2, 0.6], "ratio": [0.75, 1.333]},
           "noise": {"p": 0.0}}
    t = _small(small_stats, aug=aug)
    batch = _pattern(8)
    out = t(batch, step=2)
    lab = out["lab"]
    assert lab.dtype == torch.int64 and lab.shape == (8, 32, 32)
    before = set((batch["lab"].long() - 1).unique().tolist()) - {-1}
    assert set(lab.unique().tolist()) <= before | {IGN}
    # a crop really happened: fewer distinct labels than the whole chip has
    assert all(len(lab[i].unique()) < 900 for i in range(8))
    # masks of modalities on the same grid coincide (both nearest, same parameters)
    assert torch.equal(out["sar_valid"], out["lab_valid"])
    # the image pattern (bilinear) and the label pattern (nearest) agree on position within one pixel
    sar = torch.stack([t.denormalize("sar", out["sar"][i]) for i in range(8)])
    sar = sar - (100 * torch.arange(8)).view(8, 1, 1, 1)
    far = ~torch.nn.functional.max_pool2d((~out["sar_valid"]).float(), 3, 1, 1).bool()[:, 0]
    ok = far & (lab != IGN)
    assert ok.sum() > 1000
    assert (sar[:, 0][ok] - (lab // 32)[ok]).abs().max() <= 1.0
    assert (sar[:, 1][ok] - (lab % 32)[ok]).abs().max() <= 1.0
    # the coarse target (8 px, own grid, bilinear) follows the same crop: coarse pixel r covers fine rows 4r..4r+3
    up = lambda v: v.repeat_interleave(4, -1).repeat_interleave(4, -2)  # noqa: E731
    crs = up(out["crs"]) * 4 + 1.5
    far_c = up(~torch.nn.functional.max_pool2d((~out["crs_valid"]).float(), 3, 1, 1).bool())[:, 0]
    okc = ok & far_c
    assert okc.sum() > 1000
    assert (crs[:, 0][okc] - (lab // 32)[okc]).abs().max() <= 3.0
    assert (crs[:, 1][okc] - (lab % 32)[okc]).abs().max() <= 3.0


def test_labels_exact_through_geometry_at_full_size():
    """esawc at 448 px (uint8 LUT path) through crop + dihedral: only remapped input classes or ignore."""
    m = REGISTRY["esawc"]
    g = torch.Generator().manual_seed(3)
    codes = torch.tensor((0,) + m.class_codes[:6], dtype=torch.uint8)
    x = codes[torch.randint(0, 7, (3, 1, 448, 448), generator=g)]
    stats = _stats(REGISTRY, {"esawc": x.numpy()})
    cfg = {"train": {"resized_crop": {"p": 1.0, "scale": [0.3, 0.9]}}}
    t = build_device_transforms(cfg, REGISTRY, stats, inputs=[], targets=["esawc"], train=True)
    out = t({"esawc": x}, step=0)["esawc"]
    assert out.dtype == torch.int64 and out.shape == (3, 448, 448)
    assert set(out.unique().tolist()) <= set(range(6)) | {IGN}
    assert IGN in out.unique().tolist() and t.num_classes["esawc"] == 11
    assert t.class_names["esawc"][0] == "tree cover"


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


def test_cpu_and_cuda_agree(small_stats):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available on this machine: the CPU vs CUDA agreement runs on the GPU machine")
    aug = {"resized_crop": {"p": 0.7}, "noise": {"p": 0.0}}
    t = _small(small_stats, aug=aug)
    b = _pattern(8)
    cpu = t(b, step=1)
    gpu = t({k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}, step=1)
    for k in ("sar", "opt", "crs"):
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], atol=1e-4, rtol=1e-4)
    for k in ("lab", "sar_valid", "lab_valid", "crs_valid"):
        assert (gpu[k].cpu() != cpu[k]).float().mean() < 1e-3, k  # nearest ties may fall differently


def test_dihedral_folded_into_the_warp_matches_index_ops(small_stats):
    """With a crop in the batch, flips/rotations ride in the resampling grid; they must equal the exact index ops."""
    plain = _small(small_stats, aug={"dihedral": True, "resized_crop": {"p": 0.0}, "noise": {"p": 0.0}})
    full = {"dihedral": True, "resized_crop": {"p": 1.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0]},
            "noise": {"p": 0.0}}
    warped = _small(small_stats, aug=full)
    b = _pattern(16)
    assert torch.equal(plain.sample_params(16, 9)["dihedral"], warped.sample_params(16, 9)["dihedral"])
    d = plain.sample_params(16, 9)["dihedral"]
    assert len(d.unique()) >= 4 and (d & 4 > 0).any() and (d & 3 > 0).any()  # transposes and flips both drawn
    x, y = plain(b, step=9), warped(b, step=9)
    for k in ("lab", "sar_valid", "lab_valid", "crs", "crs_valid"):
        assert torch.equal(x[k], y[k]), k
    torch.testing.assert_close(x["sar"], y["sar"], atol=1e-5, rtol=0)


def test_on_built_shards(small_shards):
    """Registry and stats.json of a real shard root, samples decoded from its tars: every modality transforms."""
    from m3leo_stream.shard_root import ShardRoot

    root = ShardRoot(str(small_shards))
    rows = [r for r in root.read_index().to_pylist() if r["split"] == "train"]
    names = [n for n in root.modalities if all(r.get(f"{n}_offset") is not None for r in rows[:3])]
    inputs = [n for n in names if root.modalities[n].kind in ("sar_db", "optical", "coherence", "phase")]
    targets = [n for n in names if n not in inputs]
    assert {"s1grd", "s2rgbm", "esawc"} <= set(names)
    batch = {n: torch.from_numpy(np.stack([root.read_member(r, n) for r in rows[:3]])) for n in names}
    aug = {"resized_crop": {"p": 0.5}, "modality_dropout": {"p": 0.2}}
    t = build_device_transforms({"train": aug, "modalities": {"s1grd": {"ratio": True}}}, root.modalities,
                                root.stats, inputs=inputs, targets=targets, train=True, rank=1)
    out = t(batch, step=0)
    for n in inputs:
        assert out[n].dtype == torch.float32 and out[n].shape == (3, len(t.channels[n]), 448, 448)
        assert torch.isfinite(out[n]).all() and out[f"{n}_valid"].shape == (3, 1, 448, 448)
    for n in targets:
        assert out[f"{n}_valid"].dtype == torch.bool and out[f"{n}_valid"].shape[-1] == out[n].shape[-1]
        assert torch.isfinite(out[n].float()).all()
    assert out["esawc"].dtype == torch.int64 and out["esawc"].max() < 11


# -- band selection: batches that carry only the bands the transforms use ------------------------------------------
MIXED = Registry([*(SMALL[n] for n in SMALL), REGISTRY["gssic"]])


def test_bands_needed_is_what_the_transforms_read():
    from m3leo_stream.gpu_transforms import bands_needed

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


def _mixed_batch(b: int) -> dict:
    batch = _pattern(b)
    g = torch.Generator().manual_seed(5)
    gs = torch.rand(b, 38, 50, 50, generator=g)
    gs[:, :, :5] = float("nan")
    gs[:, 37] = torch.randint(0, 3, (b, 50, 50), generator=g).float()
    batch["gssic"] = gs
    return batch


@pytest.mark.parametrize("train", [True, False])
def test_selected_band_batches_give_bit_identical_outputs(train):
    """The same transforms on a batch carrying all bands and on one carrying exactly its selected bands (what the
    loader reads, named by ``batch["bands"]``): every output bit-identical, through crops, flips, noise, dropout."""
    from m3leo_stream.gpu_transforms import bands_needed

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
