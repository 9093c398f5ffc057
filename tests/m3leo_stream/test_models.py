"""Models: the multi-modal MAE (masking, per-modality masked loss, encoder save/load), UNet, MAE segmentation."""

from __future__ import annotations

import pytest
import torch

from m3leo_stream.models import MAESegmentation, MultiModalMAE, UNet, load_encoder, save_encoder
from m3leo_stream.models.mae import patchify, unpatchify

CH = {"s1grd": 4, "s2rgbm": 3, "gssic": 5}


def tiny_mae(**kw):
    args = dict(size="tiny", dim=32, depth=2, heads=2, patch_size=8, decoder_dim=32, decoder_depth=1,
                decoder_heads=2)
    args.update(kw)
    return MultiModalMAE(CH, **args)


def batch(b=2, px=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {m: torch.randn(b, c, px, px, generator=g) for m, c in CH.items()}
    for m in CH:
        out[f"{m}_valid"] = torch.ones(b, 1, px, px, dtype=torch.bool)
    out["gssic"] = torch.randn(b, 5, px // 2, px // 2, generator=g)  # coarser input: resized onto the token grid
    out["gssic_valid"] = torch.ones(b, 1, px // 2, px // 2, dtype=torch.bool)
    return out


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)


def test_mae_masks_ratio_and_losses_per_modality():
    torch.manual_seed(0)
    m = tiny_mae()
    out = m(batch())
    mask = out["mask"]
    assert mask.shape == (2, 3 * 16)
    assert mask.sum(1).tolist() == [36.0, 36.0]  # 75 % of 48 tokens
    for mod in CH:
        assert out[f"loss/{mod}"] > 0 and out[f"weight/{mod}"] > 0
    out["loss"].backward()
    assert m.encoder.patch_embed["s1grd"].weight.grad is not None


def test_mae_dropped_and_invalid_are_excluded():
    torch.manual_seed(0)
    m = tiny_mae()
    b = batch()
    b["s2rgbm_dropped"] = torch.tensor([True, True])
    b["s1grd_valid"][:] = False
    out = m(b)
    assert out["weight/s2rgbm"] == 0 and out["weight/s1grd"] == 0
    assert out["weight/gssic"] > 0
    # every token of a dropped modality is masked (never visible to the encoder)
    assert out["mask"][:, 16:32].eq(1).all()
    # the loss is the gssic loss alone
    assert torch.allclose(out["loss"], out["loss/gssic"])
    # yet every head stays in the graph (DDP with find_unused_parameters=False needs a gradient for each)
    out["loss"].backward()
    for mod in CH:
        assert m.heads[mod].weight.grad is not None, mod


def unused_parameters(model: torch.nn.Module, loss: torch.Tensor) -> list[str]:
    """Parameters that would get no gradient: what DDP with find_unused_parameters=False fails on."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_mae_uses_every_parameter_even_with_a_modality_dropped_for_the_whole_batch():
    m = tiny_mae()
    b = batch()
    b["s2rgbm_dropped"] = torch.tensor([True, True])
    b["gssic_valid"][:] = False
    assert unused_parameters(m, m(b)["loss"]) == []


@pytest.mark.parametrize("input_size,output_size,stages", [(32, 32, 4), (32, 45, 4), (32, 16, 3), (32, 4, 1),
                                                           (448, 448, 5), (448, 45, 1)])
def test_mae_segmentation_builds_only_the_stages_it_uses(input_size, output_size, stages):
    enc = tiny_mae(patch_size=8 if input_size == 32 else 16).encoder
    seg = MAESegmentation(enc, num_classes=3, decoder_channels=16, input_size=input_size, output_size=output_size)
    assert len(seg.ups) == stages
    if input_size == 32:
        y = seg(batch())
        assert y.shape == (2, 3, output_size, output_size)
        assert unused_parameters(seg, y.square().mean()) == []


def test_unet_uses_every_parameter():
    u = UNet({"a": 3}, 2, width=4, depth=2)
    assert unused_parameters(u, u({"a": torch.randn(2, 3, 16, 16)}).mean()) == []


def test_mae_loss_is_the_mean_over_valid_masked_values():
    """The per-pixel weights shared by a patch's channels give the mean over every scored (pixel, channel)."""
    m = tiny_mae()
    b = batch()
    b["s1grd_valid"][0, :, :8] = False
    g = torch.Generator().manual_seed(3)
    out = m(b, generator=g)
    p, c = 8, CH["s1grd"]
    target = patchify(b["s1grd"], p)
    valid = patchify(b["s1grd_valid"].float().expand(-1, c, -1, -1).contiguous(), p)
    w = valid * out["mask"][:, :16].unsqueeze(-1)
    want = ((out["pred/s1grd"] - target) ** 2 * w).sum() / w.sum()
    assert torch.allclose(out["loss/s1grd"], want, rtol=1e-5)
    assert out["weight/s1grd"] == w.sum()


def test_mae_padding_rows_excluded():
    torch.manual_seed(0)
    m = tiny_mae()
    b = batch()
    b["valid"] = torch.tensor([True, False])
    w1 = m(b)["weight/s1grd"]
    b["valid"] = torch.tensor([True, True])
    w2 = m(b)["weight/s1grd"]
    assert 0 < w1 < w2


def test_encoder_save_load_and_segmentation(tmp_path):
    torch.manual_seed(0)
    m = tiny_mae()
    save_encoder(m.encoder, str(tmp_path / "enc.pt"))
    enc = load_encoder(str(tmp_path / "enc.pt"))
    b = batch()
    m.encoder.eval(), enc.eval()
    assert torch.allclose(enc(b), m.encoder(b))
    seg = MAESegmentation(enc, num_classes=11, decoder_channels=32, input_size=32, output_size=32)
    assert seg(b).shape == (2, 11, 32, 32)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(str(tmp_path / "missing.pt"))


def test_unet_shapes_any_size():
    u = UNet({"a": 3, "b": 2}, 7, width=4, depth=3)
    y = u({"a": torch.randn(2, 3, 30, 30), "b": torch.randn(2, 2, 15, 15)})
    assert y.shape == (2, 7, 30, 30)


def test_mae_loss_ignores_absent_members_and_missing_bands_by_value():
    """An absent member (``<mod>_present`` False) is masked like a dropped one and never scored; a missing band
    (``<mod>_channel_valid`` False) is left out of the mean; everything else is scored as before."""
    m = tiny_mae()
    b = batch(b=3)
    b["s2rgbm_present"] = torch.tensor([True, False, True])
    b["gssic_present"] = torch.tensor([False, False, False])  # a whole batch without gssic
    b["s1grd_channel_valid"] = torch.tensor([[True, False, True, True], [True] * 4, [False, False, True, True]])
    b["s1grd_valid"][1, :, 8:16] = False
    g = torch.Generator().manual_seed(5)
    out = m(b, generator=g)
    n = 16  # tokens per modality (32 px, patch 8)
    assert out["mask"][1, n:2 * n].eq(1).all() and out["mask"][:, 2 * n:].eq(1).all()
    assert out["weight/gssic"] == 0 and out["loss/gssic"] == 0
    # s1grd: the mean over masked valid pixels × channels present in the chip
    p, c = 8, CH["s1grd"]
    target = patchify(b["s1grd"], p).view(3, n, p * p, c)
    pix = patchify(b["s1grd_valid"].float(), p) * out["mask"][:, :n].unsqueeze(-1)
    w = pix.unsqueeze(-1) * b["s1grd_channel_valid"].float().view(3, 1, 1, c)
    sq = (out["pred/s1grd"].view(3, n, p * p, c) - target) ** 2
    assert torch.allclose(out["loss/s1grd"], (sq * w).sum() / w.sum(), rtol=1e-5)
    assert out["weight/s1grd"] == w.sum()
    # s2rgbm: only the present rows count
    t2 = patchify(b["s2rgbm"], p)
    w2 = out["mask"][:, n:2 * n].unsqueeze(-1) * torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)
    assert torch.allclose(out["loss/s2rgbm"], ((out["pred/s2rgbm"] - t2) ** 2 * w2).sum() / (w2.sum() * p * p * 3),
                          rtol=1e-5)
    assert torch.allclose(out["loss"], (out["loss/s1grd"] + out["loss/s2rgbm"]) / 2)
    # garbage in absent members and missing bands changes nothing the loss sees of them
    b2 = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    b2["gssic"] = torch.full_like(b["gssic"], 1e6)
    b2["s2rgbm"][1] = 1e6
    out2 = m(b2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out2["loss"], out["loss"])
    assert torch.isfinite(out2["loss"])
    assert unused_parameters(m, out["loss"]) == []
