"""Dataset-level evaluation metrics, overall and per region, synchronised across ranks (torchmetrics).

Segmentation metrics come from ONE confusion matrix per region accumulated over the whole evaluation set (not
averaged over batches, the upstream bug); regression metrics from per-region sums of squared and absolute errors
over valid pixels. Padding rows (``valid`` False), ignored labels and invalid pixels never enter the sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def _clean(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.replace(" / ", "_").replace(" ", "_"))


class RegionConfusion(Metric):
    """Confusion matrices (regions × true × predicted) summed over the evaluation set and across ranks."""

    full_state_update = False
    cm: torch.Tensor

    def __init__(self, num_classes: int, region_names: Sequence[str], class_names: Sequence[str] | None = None,
                 ignore_index: int = -100):
        super().__init__()
        self.num_classes = int(num_classes)
        self.region_names = list(region_names)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        self.ignore_index = int(ignore_index)
        r, k = len(self.region_names), self.num_classes
        self.add_state("cm", default=torch.zeros(r, k, k, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, region: torch.Tensor,
               row_valid: torch.Tensor | None = None) -> None:
        """``preds``, ``target``: (B, H, W) class indices; ``region``: (B,) indices; ``row_valid``: (B,) bool."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        k = self.num_classes
        keep = (target != self.ignore_index) & (target >= 0) & (target < k)
        if row_valid is not None:
            keep &= row_valid.to(keep.device).bool().view(-1, *([1] * (target.dim() - 1)))
        reg = region.to(target.device).long().view(-1, *([1] * (target.dim() - 1))).expand_as(target)
        idx = (reg * k + target.long()) * k + preds.long().clamp(0, k - 1)
        counts = torch.bincount(idx[keep], minlength=len(self.region_names) * k * k)
        self.cm += counts.view_as(self.cm)

    @staticmethod
    def scores(cm: torch.Tensor) -> dict[str, torch.Tensor]:
        """mIoU (over classes present in target or prediction), per-class IoU (NaN when absent), overall
        accuracy, from one (K, K) matrix."""
        cm = cm.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        total = cm.sum()
        oa = tp.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        present = ~torch.isnan(iou)
        miou = iou[present].mean() if present.any() else torch.tensor(float("nan"), dtype=torch.float64)
        return {"miou": miou, "oa": oa, "iou": iou, "pixels": total}

    def compute(self) -> dict[str, float]:
        """Flat dict: ``miou``, ``oa``, ``iou/<class>``, ``<region>/miou``, ``<region>/oa`` (regions with pixels)."""
        out: dict[str, float] = {}
        s = self.scores(self.cm.sum(0))
        out["miou"], out["oa"] = float(s["miou"]), float(s["oa"])
        for name, v in zip(self.class_names, s["iou"].tolist()):
            out[f"iou/{_clean(name)}"] = v
        for r, region in enumerate(self.region_names):
            if self.cm[r].sum() == 0:
                continue
            sr = self.scores(self.cm[r])
            out[f"{region}/miou"], out[f"{region}/oa"] = float(sr["miou"]), float(sr["oa"])
        return out


class RegionRegression(Metric):
    """RMSE and MAE over valid pixels, overall and per region, from sums accumulated over the evaluation set."""

    full_state_update = False
    sq: torch.Tensor
    abs: torch.Tensor
    n: torch.Tensor

    def __init__(self, region_names: Sequence[str]):
        super().__init__()
        self.region_names = list(region_names)
        r = len(self.region_names)
        for name in ("sq", "abs", "n"):
            self.add_state(name, default=torch.zeros(r, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, region: torch.Tensor,
               row_valid: torch.Tensor | None = None) -> None:
        """``preds``, ``target``: (B, C, h, w) physical units; ``valid``: (B, 1|C, h, w) bool."""
        if not target.is_floating_point():
            raise TypeError(f"regression target has dtype {target.dtype}; it must stay floating point")
        w = valid.expand_as(target).double()
        if row_valid is not None:
            w = w * row_valid.to(w.device).double().view(-1, 1, 1, 1)
        err = preds.double() - target.double()
        b = target.shape[0]
        sq = (err ** 2 * w).reshape(b, -1).sum(1)
        ab = (err.abs() * w).reshape(b, -1).sum(1)
        n = w.reshape(b, -1).sum(1)
        reg = region.to(target.device).long()
        self.sq.index_add_(0, reg, sq)
        self.abs.index_add_(0, reg, ab)
        self.n.index_add_(0, reg, n)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        n = self.n.sum()
        nan = float("nan")
        out["rmse"] = float((self.sq.sum() / n).sqrt()) if n > 0 else nan
        out["mae"] = float(self.abs.sum() / n) if n > 0 else nan
        for r, region in enumerate(self.region_names):
            if self.n[r] > 0:
                out[f"{region}/rmse"] = float((self.sq[r] / self.n[r]).sqrt())
                out[f"{region}/mae"] = float(self.abs[r] / self.n[r])
        return out


class RegionLossMean(Metric):
    """Per-modality reconstruction losses as weighted means over the whole evaluation set (sum of squared errors
    over sum of weights, summed across ranks) and ``loss``, their mean. Not split by region: the MAE's sums are per
    batch, not per sample."""

    full_state_update = False
    err: torch.Tensor
    w: torch.Tensor

    def __init__(self, names: Sequence[str]):
        super().__init__()
        self.names = list(names)
        self.add_state("err", default=torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("w", default=torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, name: str, sqerr: torch.Tensor, weight: torch.Tensor) -> None:
        i = self.names.index(name)
        self.err[i] += sqerr.double().to(self.err.device)
        self.w[i] += weight.double().to(self.w.device)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        vals = []
        for i, name in enumerate(self.names):
            if self.w[i] > 0:
                v = float(self.err[i] / self.w[i])
                out[f"loss/{name}"] = v
                vals.append(v)
        out["loss"] = sum(vals) / len(vals) if vals else float("nan")
        return out


class WeightedMean(Metric):
    """Σ values / Σ weights over the evaluation set, summed across ranks (NaN when nothing was weighted)."""

    full_state_update = False
    total: torch.Tensor
    weight: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, weight: torch.Tensor) -> None:
        self.total += total.detach().double().to(self.total.device)
        self.weight += weight.detach().double().to(self.weight.device)

    def compute(self) -> float:
        return float(self.total / self.weight) if self.weight > 0 else float("nan")
