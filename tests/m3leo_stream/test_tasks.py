"""Tasks and metrics on hand-built transformed batches (contracts §3): per-region metrics, padding exclusion,
float regression targets, optimisation steps."""

from __future__ import annotations

import math

import pytest
import torch

from m3leo_stream.metrics import RegionConfusion, RegionRegression
from m3leo_stream.tasks import DataInfo, PretrainTask, RegressionTask, SegmentationTask

REGIONS = ["conus", "europe"]
UNET = {"name": "unet", "width": 4, "depth": 2}
TINY_MAE = {"size": "tiny", "dim": 32, "depth": 1, "heads": 2, "patch_size": 8, "decoder_dim": 32, "decoder_depth": 1,
            "decoder_heads": 2}


def data(in_channels: dict[str, int], **target) -> DataInfo:
    """The description of the data these tests' batches have: ``in_channels`` and ``target`` fields."""
    return DataInfo(in_channels=in_channels, channel_names={m: [f"b{i}" for i in range(c)] for m, c in
                                                            in_channels.items()}, region_names=REGIONS, **target)


def seg_data(in_channels: dict[str, int], **kw) -> DataInfo:
    return data(in_channels, target="esawc", num_classes=3, **kw)


def reg_data(in_channels: dict[str, int], **kw) -> DataInfo:
    return data(in_channels, target="biomass", out_channels=1, **kw)


def test_region_confusion_hand_built():
    cm = RegionConfusion(3, REGIONS, ["a", "b", "c"], ignore_index=-100)
    # sample 0 (conus): 4 pixels, 3 right; sample 1 (europe): all wrong; sample 2: padding (valid False)
    y = torch.tensor([[[0, 1], [2, -100]], [[0, 0], [1, 1]], [[0, 0], [0, 0]]])
    p = torch.tensor([[[0, 1], [1, 2]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    cm.update(p, y, torch.tensor([0, 1, 0]), torch.tensor([True, True, False]))
    out = cm.compute()
    # conus: pixels (y,p) = (0,0) (1,1) (2,1); ignore excluded
    # IoU0 = 1/1, IoU1 = 1/2, IoU2 = 0/1 -> miou 0.5; oa 2/3
    assert out["conus/oa"] == pytest.approx(2 / 3)
    assert out["conus/miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    # europe: (0,1)(0,1)(1,0)(1,0): IoU0 = 0, IoU1 = 0, class 2 absent -> miou 0, oa 0
    assert out["europe/oa"] == 0 and out["europe/miou"] == 0
    # overall: 7 pixels, 2 right; IoU0 = 1/(3+3-1)=0.2, IoU1 = 1/(3+4-1)... computed from the summed matrix
    total = torch.zeros(3, 3, dtype=torch.long)
    for t, q in [(0, 0), (1, 1), (2, 1), (0, 1), (0, 1), (1, 0), (1, 0)]:
        total[t, q] += 1
    ref = RegionConfusion.scores(total)
    assert out["oa"] == pytest.approx(2 / 7)
    assert out["miou"] == pytest.approx(float(ref["miou"]))
    assert out["iou/a"] == pytest.approx(float(ref["iou"][0]))


def test_confusion_accumulates_over_batches_not_averaged():
    cm = RegionConfusion(2, ["r"])
    cm.update(torch.tensor([[[0]]]), torch.tensor([[[0]]]), torch.tensor([0]))  # 1 pixel, IoU 1
    y = torch.ones(1, 3, 3, dtype=torch.long)
    cm.update(torch.zeros_like(y), y, torch.tensor([0]))  # 9 wrong pixels
    out = cm.compute()
    assert out["oa"] == pytest.approx(0.1)  # batch average would be 0.5


def test_region_regression_hand_built():
    m = RegionRegression(REGIONS)
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    y = torch.tensor([[[[1.5, 2.0]]], [[[3.0, 4.0]]]])
    valid = torch.tensor([[[[True, True]]], [[[True, False]]]])
    m.update(pred, y, valid, torch.tensor([0, 1]))
    out = m.compute()
    assert out["conus/rmse"] == pytest.approx(math.sqrt(0.25 / 2))
    assert out["europe/rmse"] == pytest.approx(3.0) and out["europe/mae"] == pytest.approx(3.0)
    assert out["rmse"] == pytest.approx(math.sqrt((0.25 + 9) / 3))
    with pytest.raises(TypeError, match="floating"):
        m.update(pred, y.long(), valid, torch.tensor([0, 1]))


def seg_batch(b=4, px=16, k=3):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (b, px, px), generator=g)
    y[0, :4] = -100
    return {"s1grd": torch.randn(b, 2, px, px, generator=g), "s2rgbm": torch.randn(b, 3, px, px, generator=g),
            "esawc": y, "esawc_valid": (y != -100).unsqueeze(1), "region": torch.tensor([0, 1, 0, 1]),
            "valid": torch.tensor([True, True, True, False]), "key": [f"k{i}" for i in range(b)]}


def test_segmentation_task_metrics_exclude_padding():
    t = SegmentationTask(UNET, seg_data({"s1grd": 2, "s2rgbm": 3}, class_names=["a", "b", "c"]))
    b = seg_batch()
    logits, y = t.logits_and_target(b)
    assert (y[3] == -100).all()  # padding row ignored
    loss = t.loss(logits, y)
    assert torch.isfinite(loss)
    t.val_metric.update(logits.argmax(1), y, b["region"], b["valid"])
    assert int(t.val_metric.cm.sum()) == 3 * 16 * 16 - 4 * 16  # 3 real rows, 64 ignored pixels
    # a batch with nothing labelled gives a zero loss, not NaN
    b2 = dict(b, esawc=torch.full_like(b["esawc"], -100))
    lg, yy = t.logits_and_target(b2)
    assert t.loss(lg, yy).item() == 0.0


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0]])
def test_segmentation_loss_is_cross_entropys_mean_without_asking_the_device(weights):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 8, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (3, 8, 8), generator=g)
    y[0, :4] = -100
    t = SegmentationTask(UNET, seg_data({"s1grd": 2}), class_weights=weights)
    want = torch.nn.functional.cross_entropy(logits, y, weight=None if weights is None else torch.tensor(weights),
                                             ignore_index=-100)
    assert torch.allclose(t.loss(logits, y), want)
    none = t.loss(logits, torch.full_like(y, -100))
    none.backward()
    assert none.item() == 0.0 and logits.grad.abs().sum() == 0


def test_eval_loss_is_over_the_whole_set():
    """val/loss is the mean over every labelled pixel of the evaluation set, not a mean of batch means."""
    t = SegmentationTask(UNET, seg_data({"s1grd": 2}))
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 3, (2, 4, 4), generator=g) for _ in range(2)]
    ys[1][:, :3] = -100  # the second batch has few labelled pixels
    for lg, y in zip(logits, ys):
        t.val_loss.update(*t.loss_terms(lg, y))
    want = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(ys), ignore_index=-100)
    assert t.val_loss.compute() == pytest.approx(float(want))


def test_pretrain_masks_differ_across_ranks_and_repeat_per_step(monkeypatch):
    t = PretrainTask(TINY_MAE, data({"s1grd": 2}), seed=3)

    def masks(rank: int) -> torch.Tensor:
        monkeypatch.setattr(PretrainTask, "global_rank", property(lambda self: rank))
        return torch.rand(64, generator=t.mask_generator(torch.device("cpu")))

    assert torch.equal(masks(0), masks(0)) and not torch.equal(masks(0), masks(1))


def test_regression_keeps_float_targets_and_coarse_grid():
    t = RegressionTask(UNET, reg_data({"s1grd": 2}, target_mean=[100.0], target_std=[50.0]))
    y = torch.full((2, 1, 5, 5), 123.75)
    b = {"s1grd": torch.randn(2, 2, 20, 20), "biomass": y, "biomass_valid": torch.ones(2, 1, 5, 5, dtype=torch.bool),
         "region": torch.tensor([0, 1]), "valid": torch.tensor([True, True])}
    pred, target, w = t.predict_target(b)
    assert pred.shape == (2, 1, 5, 5) and target.dtype == torch.float32
    assert torch.equal(target, y)  # 123.75 not truncated to 123
    t.val_metric.update(pred, target, w, b["region"])
    with torch.no_grad():
        t.model.head.weight.zero_()
        t.model.head.bias.fill_((123.75 - 100) / 50)
    pred, target, w = t.predict_target(b)
    assert torch.allclose(pred, y)
    assert t.loss(pred, target, w).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(TypeError, match="never cast"):
        t.predict_target(dict(b, biomass=y.long()))


def test_pretrain_task_step_and_checkpoint_info():
    t = PretrainTask(TINY_MAE, data({"s1grd": 2, "s2rgbm": 3}))
    b = {"s1grd": torch.randn(2, 2, 16, 16), "s2rgbm": torch.randn(2, 3, 16, 16), "valid": torch.tensor([True, True]),
         "region": torch.tensor([0, 1])}
    t._eval_step(b, 0, t.val_metric, "val")
    out = t.val_metric.compute()
    assert set(out) == {"loss", "loss/s1grd", "loss/s2rgbm"}
    t.val_metric.reset()
    t._eval_step(b, 0, t.val_metric, "val")
    assert t.val_metric.compute()["loss"] == pytest.approx(out["loss"])  # validation masks are fixed
    ck: dict = {}
    t.run_info["wandb_run_id"] = "abc"
    t.on_save_checkpoint(ck)
    assert ck["m3leo"]["wandb_run_id"] == "abc" and ck["m3leo"]["encoder_config"]["in_channels"] == {"s1grd": 2,
                                                                                                     "s2rgbm": 3}


def test_image_panels_for_segmentation_and_regression():
    from m3leo_stream import render
    from m3leo_stream.callbacks import ImagePanels

    t = SegmentationTask(UNET, seg_data({"s1grd": 2, "s2rgbm": 3}))
    t.channel_names = {"s1grd": ["summer_vv_asc", "summer_vh_asc"], "s2rgbm": ["07_red", "07_green", "07_blue"]}
    panels = ImagePanels(max_images=2).panels(t, seg_batch())
    assert set(panels) == {"s1grd", "s2rgbm", "prediction"}
    cap, img = panels["prediction"][0]
    assert img.shape == (256, 512, 3) and img.dtype.name == "uint8" and "prediction | label" in cap
    assert panels["s2rgbm"][0][1].shape == (256, 256, 3)  # 16 px inputs drawn at a size one can see
    ignored = render.NODATA_RGB
    assert (img[:64, 256:] == ignored).all() and not (img[64:, 256:] == ignored).all(-1).any()  # label's -100 rows
    r = RegressionTask(UNET, reg_data({"s1grd": 2}))
    b = {"s1grd": torch.randn(2, 2, 20, 20), "biomass": torch.rand(2, 1, 5, 5) * 100,
         "biomass_valid": torch.ones(2, 1, 5, 5, dtype=torch.bool), "region": torch.tensor([0, 1]),
         "valid": torch.tensor([True, True]), "key": ["a", "b"]}
    panels = ImagePanels(max_images=1, size=100).panels(r, b)
    assert panels["prediction"][0][1].shape == (100, 200, 3)
    assert r.training  # panels put the module back in training mode


def test_a_misspelled_task_or_model_key_is_an_error():
    with pytest.raises(TypeError, match="optimzer"):
        SegmentationTask(UNET, seg_data({"s1grd": 2}), optimzer={"lr": 1.0})
    with pytest.raises(TypeError, match="lrr"):
        SegmentationTask(UNET, seg_data({"s1grd": 2}), optimizer={"lrr": 1.0})
    with pytest.raises(TypeError, match="widht"):
        SegmentationTask({"name": "unet", "widht": 4}, seg_data({"s1grd": 2}))
    with pytest.raises(TypeError, match="dimm"):
        PretrainTask({**TINY_MAE, "dimm": 3}, data({"s1grd": 2}))
    with pytest.raises(TypeError, match="num_clases"):
        SegmentationTask(UNET, {**vars(seg_data({"s1grd": 2})), "num_clases": 3})
    with pytest.raises(ValueError, match="segmentation needs a target"):
        SegmentationTask(UNET, data({"s1grd": 2}))


def test_tasks_take_their_settings_typed_or_as_dicts():
    t = SegmentationTask(UNET, vars(seg_data({"s1grd": 2})), optimizer={"name": "sgd", "lr": 0.5},
                         scheduler={"name": "none"})
    assert isinstance(t.data_info, DataInfo) and t.data_info.num_classes == 3 and t.inputs == ["s1grd"]
    assert t.hparams["data_info"]["num_classes"] == 3 and t.hparams["optimizer"]["name"] == "sgd"
    opt = t.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.5 and opt.defaults["momentum"] == 0.9
