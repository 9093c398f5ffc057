"""LightningModules: multi-modal MAE pretraining, segmentation and pixel regression.

Batches arrive transformed (contracts §3): standardised float inputs, int64 class maps with ``ignore_index``, float
regression targets in physical units with ``<mod>_valid`` masks, ``region`` indices and the ``valid`` row flag
(False only for evaluation padding). Evaluation metrics are dataset-level and per region (:mod:`metrics`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from m3leo_stream.metrics import RegionConfusion, RegionLossMean, RegionRegression, WeightedMean
from m3leo_stream.models import MAESegmentation, MultiModalMAE, UNet, load_encoder
from m3leo_stream.transforms import seed_of

log = logging.getLogger(__name__)

__all__ = ["BaseTask", "DataInfo", "OptimizerConfig", "PretrainTask", "RegressionTask", "SchedulerConfig",
           "SegmentationTask", "build_optimizer"]


@dataclass(frozen=True)
class DataInfo:
    """What a task needs to know of the data: per input its channels, the regions, and the (first) target —
    its classes (categorical) or bands and their physical mean/std (regression). ``train.describe_data`` makes it."""

    in_channels: dict[str, int]
    channel_names: dict[str, list[str]]
    region_names: list[str]
    ignore_index: int = -100
    input_px: int | None = None
    target: str | None = None
    target_px: int | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    out_channels: int | None = None
    target_bands: list[str] | None = None
    target_mean: list[float] | None = None
    target_std: list[float] | None = None

    @property
    def inputs(self) -> list[str]:
        return list(self.in_channels)

    def require(self, *names: str, task: str) -> None:
        """Raise unless the fields ``names`` are set (the target a task needs)."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{task} needs a target with {missing} (targets: {self.target or 'none'})")


@dataclass
class OptimizerConfig:
    """``task.optimizer``: ``betas`` for adam(w), ``momentum`` for sgd."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9


@dataclass
class SchedulerConfig:
    """``task.scheduler``: linear warm-up over ``warmup_steps``, then ``name`` down to ``min_lr_ratio`` × lr at
    ``total_steps`` (null: the trainer's estimate); ``none``: no scheduler."""

    name: Literal["cosine", "linear", "constant", "none"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int | None = None


def _config(cls: type, cfg: Any) -> Any:
    """``cfg`` (None, a mapping or a ``cls``) as a ``cls``; an unknown key is a TypeError naming it."""
    if cfg is None:
        return cls()
    return cfg if isinstance(cfg, cls) else cls(**cfg)


def build_optimizer(params, cfg: OptimizerConfig | Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names (an :class:`OptimizerConfig` or its mapping)."""
    c = _config(OptimizerConfig, cfg)
    name, lr, wd = str(c.name).lower(), float(c.lr), float(c.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=tuple(c.betas))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=tuple(c.betas))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(c.momentum))
    raise ValueError(f"unknown optimizer {name!r} (adamw, adam, sgd)")


def _lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        if kind == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "linear":
            return min_ratio + (1 - min_ratio) * (1 - t)
        raise ValueError(f"unknown scheduler {kind!r} (cosine, linear, constant)")
    return f


class BaseTask(pl.LightningModule):
    """Optimiser/schedule from config, input selection, and run information stored in checkpoints. ``data_info``
    (a :class:`DataInfo` or its dict) describes the data; ``optimizer``/``scheduler``: :class:`OptimizerConfig`,
    :class:`SchedulerConfig` or their dicts (None: their defaults); ``seed``: the run's, for the task's own random
    draws."""

    def __init__(self, data_info: DataInfo | Mapping[str, Any], optimizer: OptimizerConfig | None = None,
                 scheduler: SchedulerConfig | None = None, seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.data_info = _config(DataInfo, data_info)
        self.inputs = self.data_info.inputs
        self.region_names = list(self.data_info.region_names)
        self.channel_names = {m: list(c) for m, c in self.data_info.channel_names.items()}
        self.optimizer_cfg = _config(OptimizerConfig, optimizer)
        self.scheduler_cfg = _config(SchedulerConfig, scheduler)
        self.run_info: dict[str, Any] = {}  # e.g. wandb_run_id; written into every checkpoint
        self.denormalize = None  # set by train.py: transforms.denormalize (for image panels)

    def _save_hyperparameters(self) -> None:
        """The caller's init arguments as hyperparameters (checkpoints keep them), ``data_info`` as a plain dict."""
        self.save_hyperparameters(ignore=["data_info"], frame=inspect.currentframe().f_back)  # type: ignore[union-attr]
        self.hparams["data_info"] = dataclasses.asdict(self.data_info)

    # -- helpers ---------------------------------------------------------------------------------------------
    def input_dict(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        missing = [m for m in self.inputs if m not in batch]
        if missing:
            raise KeyError(f"batch lacks inputs {missing} (keys: {sorted(map(str, batch))})")
        return {m: batch[m] for m in self.inputs}

    @staticmethod
    def row_valid(batch: Mapping[str, Any], b: int, device: torch.device) -> torch.Tensor:
        v = batch.get("valid")
        if v is None:
            return torch.ones(b, dtype=torch.bool, device=device)
        return torch.as_tensor(v, device=device).bool().view(-1)

    @staticmethod
    def region_of(batch: Mapping[str, Any], b: int, device: torch.device) -> torch.Tensor:
        r = batch.get("region")
        if r is None:
            return torch.zeros(b, dtype=torch.long, device=device)
        return torch.as_tensor(r, device=device).long().view(-1)

    def batch_size_of(self, batch: Mapping[str, Any]) -> int:
        return int(batch[self.inputs[0]].shape[0])

    def log_dict_flat(self, prefix: str, values: Mapping[str, float], **kw: Any) -> None:
        vals = {f"{prefix}/{k}": v for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))}
        if vals:
            self.log_dict(vals, **kw)

    # -- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = build_optimizer(params, self.optimizer_cfg)
        sc = self.scheduler_cfg
        kind = str(sc.name).lower()
        if kind in ("none", "null"):
            return opt
        warmup = int(sc.warmup_steps)
        total = int(sc.total_steps or 0)
        if not total:
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except Exception:  # noqa: BLE001 - no trainer / infinite loader: fall back to warm-up only
                total = warmup + 1
            if not math.isfinite(total) or total <= 0:
                total = warmup + 1
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(kind, warmup, total, float(sc.min_lr_ratio)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def extra_checkpoint_info(self) -> dict[str, Any]:
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["m3leo"] = {**self.run_info, **self.extra_checkpoint_info()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("m3leo") or {}
        for k in ("wandb_run_id",):
            if k in info and k not in self.run_info:
                self.run_info[k] = info[k]

    # -- evaluation: subclasses set ``val_metric``/``test_metric`` and implement ``_eval_step`` -----------------
    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, metric: Any, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metric, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metric, "test")

    def finish_loss(self, mean: float) -> float:
        """``<stage>/loss`` from the weighted mean of the loss terms over the evaluation set."""
        return mean

    def _log_epoch_end(self, stage: str) -> None:
        # every rank computes and logs the same reduced values (the metrics all-reduce their sums), so no rank
        # waits in a reduction that another never enters
        metric = getattr(self, f"{stage}_metric")
        values = dict(metric.compute())
        metric.reset()
        loss = getattr(self, f"{stage}_loss", None)
        if loss is not None:
            values["loss"] = self.finish_loss(loss.compute())
            loss.reset()
        self.log_dict_flat(stage, values)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_end("test")

    # -- image panels ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def panel_outputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Tensors to draw next to the inputs: ``pred`` / ``label`` maps or reconstructions (see callbacks)."""
        return {}


class PretrainTask(BaseTask):
    """Multi-modal MAE pretraining: reconstruction loss per modality and overall."""

    def __init__(self, model: Mapping[str, Any], data_info: DataInfo | Mapping[str, Any],
                 optimizer: OptimizerConfig | None = None, scheduler: SchedulerConfig | None = None,
                 val_mask_seed: int = 1234, seed: int = 0):
        super().__init__(data_info, optimizer, scheduler, seed)
        self._save_hyperparameters()
        kw = {k: v for k, v in dict(model).items() if k not in ("name",)}
        self.model = MultiModalMAE(dict(self.data_info.in_channels), **kw)
        self.val_mask_seed = int(val_mask_seed)
        self.val_metric = RegionLossMean(self.model.modalities)
        self.test_metric = RegionLossMean(self.model.modalities)

    @property
    def encoder(self):
        return self.model.encoder

    def extra_checkpoint_info(self) -> dict[str, Any]:
        return {"encoder_config": self.model.encoder.config}

    def mask_generator(self, device: torch.device) -> torch.Generator:
        """The training masks' generator, seeded by (seed, rank, step): a different mask on every rank, and the
        same ones again when a run resumes."""
        g = torch.Generator(device=device)
        g.manual_seed(seed_of(self.seed, self.global_rank, self.global_step, "mae-mask"))
        return g

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model(batch, generator=self.mask_generator(batch[self.inputs[0]].device))
        b = self.batch_size_of(batch)
        logs = {"train/loss": out["loss"].detach()}
        for m in out["modalities"]:  # NaN when nothing of m was scored in this batch (no host sync to find out)
            w = out[f"weight/{m}"]
            logs[f"train/loss/{m}"] = torch.where(w > 0, out[f"loss/{m}"].detach(), torch.nan)
        self.log_dict(logs, batch_size=b, prog_bar=False)
        self.log("loss", out["loss"].detach(), batch_size=b, prog_bar=True, logger=False)
        return out["loss"]

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, metric: RegionLossMean, stage: str) -> None:
        dev = batch[self.inputs[0]].device
        g = torch.Generator(device=dev)
        g.manual_seed(self.val_mask_seed + batch_idx)  # the same masks every validation: comparable losses
        out = self.model(batch, generator=g)
        for m in out["modalities"]:
            metric.update(m, out[f"sqerr/{m}"], out[f"weight/{m}"])

    @torch.no_grad()
    def panel_outputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        res = {}
        for m in out["modalities"]:
            recon, masked = self.model.reconstruct(batch, out, m)
            res[f"recon/{m}"], res[f"masked/{m}"] = recon, masked
        return res


def _build_dense_model(model: Mapping[str, Any], in_channels: Mapping[str, int], out_channels: int,
                       input_px: int | None, target_px: int | None):
    """``model``: ``name`` (unet | mae_seg) and that model's arguments (an unknown one is a TypeError)."""
    cfg = dict(model)
    name = cfg.pop("name", "unet")
    if name == "unet":
        return UNet(dict(in_channels), out_channels, **cfg)
    if name == "mae_seg":
        enc_src, enc_cfg = cfg.pop("encoder", None), cfg.pop("encoder_config", None)
        if enc_src:
            encoder = load_encoder(str(enc_src))
        elif enc_cfg:
            encoder = __import__("m3leo_stream.models", fromlist=["MultiModalEncoder"]).MultiModalEncoder(**enc_cfg)
        else:
            raise ValueError("model.encoder (checkpoint path or URL of a pretraining run) is required for mae_seg")
        want = {m: c for m, c in in_channels.items()}
        have = encoder.config["in_channels"]
        bad = {m: (c, have.get(m)) for m, c in want.items() if have.get(m) != c}
        if bad:
            raise ValueError(f"encoder from {enc_src} does not fit the inputs: (channels now, at pretraining) {bad}; "
                             f"use the pretraining run's transforms band selection")
        if not input_px:
            raise ValueError("mae_seg needs the input side (input_px) to build its decoder stages")
        return MAESegmentation(encoder, out_channels, **cfg, input_size=int(input_px),
                               output_size=int(target_px or input_px))
    raise ValueError(f"unknown dense model {name!r} (unet, mae_seg)")


def _forward_dense(model, inputs: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    if isinstance(model, MAESegmentation):
        return model(inputs, output_size=size[-1])
    return model(inputs)


class SegmentationTask(BaseTask):
    """Pixel classification with cross-entropy (``ignore_index`` and padding rows excluded).

    Metrics (val/test): ``miou``, ``oa``, ``iou/<class>``, and ``<region>/miou``, ``<region>/oa``."""

    def __init__(self, model: Mapping[str, Any], data_info: DataInfo | Mapping[str, Any],
                 optimizer: OptimizerConfig | None = None, scheduler: SchedulerConfig | None = None,
                 class_weights: Sequence[float] | None = None, seed: int = 0):
        super().__init__(data_info, optimizer, scheduler, seed)
        self._save_hyperparameters()
        d = self.data_info
        d.require("target", "num_classes", task="segmentation")
        self.target = str(d.target)
        self.num_classes = int(d.num_classes)
        self.class_names = list(d.class_names) if d.class_names else [str(i) for i in range(self.num_classes)]
        self.ignore_index = int(d.ignore_index)
        self.model = _build_dense_model(model, d.in_channels, self.num_classes, d.input_px, d.target_px)
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32)
                             if class_weights else None, persistent=False)
        self.val_metric = RegionConfusion(self.num_classes, self.region_names, self.class_names, self.ignore_index)
        self.test_metric = RegionConfusion(self.num_classes, self.region_names, self.class_names, self.ignore_index)
        self.val_loss, self.test_loss = WeightedMean(), WeightedMean()

    def extra_checkpoint_info(self) -> dict[str, Any]:
        if isinstance(self.model, MAESegmentation):
            return {"encoder_config": self.model.encoder.config}
        return {}

    def logits_and_target(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        y = batch[self.target]
        if y.dim() == 4:
            y = y[:, 0]
        y = y.long()
        logits = _forward_dense(self.model, self.input_dict(batch), tuple(y.shape[-2:]))
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        rv = self.row_valid(batch, y.shape[0], y.device)
        y = y.masked_fill(~rv.view(-1, 1, 1), self.ignore_index)
        return logits, y

    def loss_terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-pixel cross-entropies, sum of their weights): the class-weighted mean is their ratio."""
        weights = self.class_weights if isinstance(self.class_weights, torch.Tensor) else None
        total = F.cross_entropy(logits.float(), y, weight=weights, ignore_index=self.ignore_index, reduction="sum")
        labelled = y != self.ignore_index
        if weights is None:
            return total, labelled.sum().float()
        return total, (weights[y.clamp(min=0)] * labelled).sum()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labelled pixels (F.cross_entropy's mean), 0 with no gradient when nothing in the
        batch is labelled; computed on the device without asking whether anything is."""
        total, weight = self.loss_terms(logits, y)
        return total / weight.clamp(min=torch.finfo(torch.float32).tiny)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        logits, y = self.logits_and_target(batch)
        loss = self.loss(logits, y)
        self.log("train/loss", loss.detach(), batch_size=y.shape[0], prog_bar=True)
        return loss

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, cm: RegionConfusion, stage: str) -> None:
        logits, y = self.logits_and_target(batch)
        (self.val_loss if stage == "val" else self.test_loss).update(*self.loss_terms(logits, y))
        cm.update(logits.argmax(1), y, self.region_of(batch, y.shape[0], y.device),
                  self.row_valid(batch, y.shape[0], y.device))

    @torch.no_grad()
    def panel_outputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        logits, y = self.logits_and_target(batch)
        return {"pred": logits.argmax(1), "label": y}


class RegressionTask(BaseTask):
    """Pixel regression on the target's own (possibly coarse) grid with a masked RMSE loss.

    The network predicts standardised values (``target_mean``/``target_std``, from stats.json) that are mapped back
    to physical units; a prediction finer than the target grid is area-averaged onto it (mean-preserving). Targets
    stay floating point (upstream cast them to integers). Metrics: ``rmse``, ``mae``, ``<region>/rmse|mae``."""

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, model: Mapping[str, Any], data_info: DataInfo | Mapping[str, Any],
                 optimizer: OptimizerConfig | None = None, scheduler: SchedulerConfig | None = None,
                 seed: int = 0):
        super().__init__(data_info, optimizer, scheduler, seed)
        self._save_hyperparameters()
        d = self.data_info
        d.require("target", "out_channels", task="regression")
        self.target = str(d.target)
        self.out_channels = int(d.out_channels)
        self.model = _build_dense_model(model, d.in_channels, self.out_channels, d.input_px, d.target_px)
        mean = torch.tensor(d.target_mean if d.target_mean else [0.0] * self.out_channels, dtype=torch.float32)
        std = torch.tensor(d.target_std if d.target_std else [1.0] * self.out_channels, dtype=torch.float32)
        self.register_buffer("target_mean", mean.view(1, -1, 1, 1))
        self.register_buffer("target_std", std.clamp(min=1e-6).view(1, -1, 1, 1))
        self.val_metric = RegionRegression(self.region_names)
        self.test_metric = RegionRegression(self.region_names)
        self.val_loss, self.test_loss = WeightedMean(), WeightedMean()  # of standardised squared errors

    def predict_target(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prediction in physical units, target, weight) on the target's grid."""
        y = batch[self.target]
        if not y.is_floating_point():
            raise TypeError(f"regression target {self.target!r} has dtype {y.dtype}; it must be floating point "
                            f"(never cast to integers)")
        if y.dim() == 3:
            y = y.unsqueeze(1)
        out = _forward_dense(self.model, self.input_dict(batch), tuple(y.shape[-2:])).float()
        h, w = y.shape[-2:]
        if out.shape[-2:] != (h, w):
            if out.shape[-2] >= h and out.shape[-1] >= w:
                out = F.adaptive_avg_pool2d(out, (h, w))
            else:
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        pred = out * self.target_std + self.target_mean
        valid = batch.get(f"{self.target}_valid")
        weight = (torch.ones_like(y, dtype=torch.bool) if valid is None else valid.bool().expand_as(y))
        weight = weight & self.row_valid(batch, y.shape[0], y.device).view(-1, 1, 1, 1)
        chan = batch.get(f"{self.target}_channel_valid")  # (B, C): a band the chip lacks is never scored
        if chan is not None and chan.shape[-1] == y.shape[1]:
            weight = weight & chan.bool().view(*chan.shape, 1, 1)
        return pred, y, weight

    def loss_terms(self, pred: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        """(sum of squared standardised errors over valid values, their number)."""
        w = weight.float()
        diff = (pred - y) / self.target_std  # standardised: balanced across channels
        return (diff ** 2 * w).sum(), w.sum()

    def finish_loss(self, mean: float) -> float:
        return math.sqrt(mean) if mean >= 0 else mean  # NaN stays NaN

    def loss(self, pred: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSE of standardised values over valid pixels; with none, ~0 and no gradient (no host sync to check)."""
        sq, n = self.loss_terms(pred, y, weight)
        return torch.sqrt(sq / n.clamp(min=1.0) + 1e-12)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        pred, y, w = self.predict_target(batch)
        loss = self.loss(pred, y, w)
        self.log("train/loss", loss.detach(), batch_size=y.shape[0], prog_bar=True)
        with torch.no_grad():
            n = w.float().sum().clamp(min=1)
            self.log("train/rmse", torch.sqrt((((pred - y) ** 2) * w).sum() / n), batch_size=y.shape[0])
        return loss

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, metric: RegionRegression,
                   stage: str) -> None:
        pred, y, w = self.predict_target(batch)
        (self.val_loss if stage == "val" else self.test_loss).update(*self.loss_terms(pred, y, w))
        metric.update(pred, y, w, self.region_of(batch, y.shape[0], y.device))

    @torch.no_grad()
    def panel_outputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        pred, y, w = self.predict_target(batch)
        return {"pred": pred[:, 0], "label": torch.where(w[:, 0], y[:, 0], torch.nan)}
