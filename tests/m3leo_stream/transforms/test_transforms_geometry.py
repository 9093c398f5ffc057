"""Joint geometry: dihedral and resized crops move every modality and mask of a sample the same way."""

from __future__ import annotations

import torch
from transforms_cases import IGN, _element, _pattern, _small, _stats

from m3leo_stream.modalities import REGISTRY
from m3leo_stream.transforms import build_device_transforms, dihedral


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
