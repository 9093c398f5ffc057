"""Training callbacks: throughput and data-wait, device memory, loader metrics, image panels, key recording."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["LastCheckpoint", "ImagePanels", "KeyRecorder", "LoaderMetrics", "TrainingSpeed", "class_colours", "false_colour_s1",
           "rgb_s2"]


class TrainingSpeed(pl.Callback):
    """Samples/s (per device and total), data-wait fraction and device memory, logged every ``every_n_steps``.

    Data wait = time from the end of one training batch to the start of the next (fetching, collating and the
    host→device transfer of the next batch, as seen by the training loop); the fraction is the sum of waits over
    the sum of full step times (end to end) in the window. Samples count the rows of training batches (never padded).
    """

    def __init__(self, every_n_steps: int = 50):
        self.every = max(1, int(every_n_steps))
        self._last_end: float | None = None
        self._wait = 0.0
        self._step = 0.0
        self._samples = 0
        self._t_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = time.perf_counter()  # the first batch's fetch counts as waiting

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end
        self._t_start = now
        # training batches have no padding rows: count keys (host side; summing a device mask would sync)
        if isinstance(batch, Mapping) and "key" in batch:
            self._samples += len(batch["key"])
        elif isinstance(batch, Mapping) and isinstance(batch.get("valid"), torch.Tensor):
            self._samples += int(batch["valid"].shape[0])

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._step += now - self._last_end
        self._last_end = now
        if trainer.global_step % self.every == 0 and self._step > 0:
            world = max(1, trainer.world_size)
            per_dev = float(self._samples) / self._step
            logs = {
                "perf/samples_per_s_per_device": per_dev,
                "perf/samples_per_s": per_dev * world,
                "perf/data_wait_frac": self._wait / self._step,
                "perf/step_time_s": self._step / max(1, self.every),
            }
            logs.update(device_memory(pl_module.device))
            pl_module.log_dict(logs, on_step=True, on_epoch=False, rank_zero_only=True)
            self._wait = self._step = 0.0
            self._samples = 0


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (GiB) on CUDA, else the process's peak resident set (GiB)."""
    if device.type == "cuda":
        return {"perf/gpu_mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "perf/gpu_mem_reserved_gb": torch.cuda.memory_reserved(device) / 2 ** 30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"perf/cpu_rss_peak_gb": rss_bytes / 2 ** 30}


class LoaderMetrics(pl.Callback):
    """``datamodule.loader_metrics()`` (samples/s, bytes/s, retries, substitutions, wait) as ``loader/*``, plus
    the fraction of wall time the training loop was blocked on the loader since the last log."""

    def __init__(self, every_n_steps: int = 50):
        self.every = max(1, int(every_n_steps))
        self._prev: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every:
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "loader_metrics"):
            return
        m = {k: float(v) for k, v in dm.loader_metrics().items() if isinstance(v, (int, float))}
        now = time.perf_counter()
        if "wait_s" in m:
            if self._prev is not None and now > self._prev[0]:
                m["wait_frac"] = (m["wait_s"] - self._prev[1]) / (now - self._prev[0])
            self._prev = (now, m["wait_s"])
        pl_module.log_dict({f"loader/{k}": v for k, v in m.items()}, on_step=True, on_epoch=False,
                           rank_zero_only=True)


class LastCheckpoint(pl.Callback):
    """Write ``path`` (the run's ``last.ckpt``, any fsspec URL) inside the training loop every ``every_n_steps``
    steps and at the last step (``max_steps``), and at the end of training when fitting stopped otherwise
    (``max_epochs``: the epoch is then really finished).

    Why not ModelCheckpoint(save_last=True): Lightning 2.6 also writes ``last`` in ``on_train_end`` when it has not
    saved one yet, i.e. AFTER the loop, and a checkpoint written after the loop records the epoch as finished, so a
    run stopped by ``max_steps`` mid-epoch and resumed from it would skip the rest of that epoch."""

    def __init__(self, path: str, every_n_steps: int | None = None):
        self.path = path
        self.every = int(every_n_steps or 0)
        self._saved_step = -1

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._saved_step:
            return
        if (trainer.max_steps > 0 and step >= trainer.max_steps) or (self.every and step % self.every == 0):
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer)


class KeyRecorder(pl.Callback):
    """Append ``<epoch>\\t<global_step>\\t<key>`` per consumed training sample to ``<dir>/rank<global_rank>.tsv``
    (flushed every batch). Padding rows (``valid`` False) are not recorded."""

    def __init__(self, directory: str):
        self.directory = str(directory)
        self._f = None

    def on_train_start(self, trainer, pl_module) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._f = open(os.path.join(self.directory, f"rank{trainer.global_rank}.tsv"), "a", buffering=1)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._f is None or not isinstance(batch, Mapping) or "key" not in batch:
            return
        keys = batch["key"]
        valid = batch.get("valid")
        flags = valid.tolist() if isinstance(valid, torch.Tensor) else [True] * len(keys)
        lines = [f"{trainer.current_epoch}\t{trainer.global_step}\t{k}\n" for k, ok in zip(keys, flags) if ok]
        self._f.write("".join(lines))
        self._f.flush()

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()


# --- image panels ----------------------------------------------------------------------------------------------

_WORLDCOVER_RGB = [(0, 100, 0), (255, 187, 34), (255, 255, 76), (240, 150, 255), (250, 0, 0), (180, 180, 180),
                   (240, 240, 240), (0, 100, 200), (0, 150, 160), (0, 207, 117), (250, 230, 160)]


def class_colours(k: int) -> np.ndarray:
    """(K, 3) uint8 colours: the ESA WorldCover legend for 11 classes, a fixed random palette otherwise."""
    if k == len(_WORLDCOVER_RGB):
        return np.array(_WORLDCOVER_RGB, dtype=np.uint8)
    rng = np.random.default_rng(0)
    return rng.integers(40, 255, size=(k, 3), dtype=np.uint8)


def _stretch(x: np.ndarray) -> np.ndarray:
    """(H, W, C) float → uint8 by a 2–98 % percentile stretch per channel (NaN → 0)."""
    out = np.zeros(x.shape, dtype=np.uint8)
    for c in range(x.shape[-1]):
        ch = x[..., c]
        ok = np.isfinite(ch)
        if not ok.any():
            continue
        lo, hi = np.percentile(ch[ok], [2, 98])
        out[..., c] = (np.clip((np.nan_to_num(ch, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    return out


def _pick(names: Sequence[str], suffixes: Sequence[str]) -> list[int] | None:
    """Indices of one channel per suffix sharing the same prefix (the middle such prefix, e.g. a summer month)."""
    groups: dict[str, dict[str, int]] = {}
    for i, n in enumerate(names):
        for s in suffixes:
            if n.endswith(s):
                groups.setdefault(n[: -len(s)], {})[s] = i
    full = [g for g in groups.values() if len(g) == len(suffixes)]
    if not full:
        return None
    g = full[len(full) // 2]
    return [g[s] for s in suffixes]


def rgb_s2(x: torch.Tensor, names: Sequence[str]) -> np.ndarray | None:
    """(C, H, W) S2 channels → (H, W, 3) uint8 true colour."""
    idx = _pick(names, ("_red", "_green", "_blue")) if names else None
    if idx is None:
        idx = [0, 1, 2] if x.shape[0] >= 3 else None
    if idx is None:
        return None
    return _stretch(x[idx].permute(1, 2, 0).float().cpu().numpy())


def false_colour_s1(x: torch.Tensor, names: Sequence[str]) -> np.ndarray | None:
    """(C, H, W) S1 dB channels → (H, W, 3) uint8: R = VV, G = VH, B = VV − VH."""
    pair = None
    for i, n in enumerate(names or []):
        if "_vv_" in n or n.endswith("_vv"):
            partner = n.replace("_vv", "_vh")
            if partner in names:
                pair = (i, list(names).index(partner))
                break
    if pair is None:
        if x.shape[0] < 2:
            return None
        pair = (0, 1)
    vv, vh = x[pair[0]].float(), x[pair[1]].float()
    return _stretch(torch.stack([vv, vh, vv - vh], -1).cpu().numpy())


def _classes(y: torch.Tensor, k: int) -> np.ndarray:
    pal = class_colours(k)
    a = y.cpu().numpy()
    img = np.zeros(a.shape + (3,), dtype=np.uint8)
    ok = (a >= 0) & (a < k)
    img[ok] = pal[a[ok]]
    return img


def _upsample(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size:
        return img
    rep = max(1, int(round(size / img.shape[0])))
    return np.repeat(np.repeat(img, rep, 0), rep, 1)


class ImagePanels(pl.Callback):
    """Every ``every_n_steps`` training steps, log up to ``max_images`` panels of the current (transformed) batch
    to W&B: S2 RGB, S1 false colour (inputs in physical units via the transforms' ``denormalize``), and the task's
    reconstruction or prediction next to the label. Needs a WandbLogger; does nothing otherwise."""

    def __init__(self, every_n_steps: int = 500, max_images: int = 4):
        self.every = max(1, int(every_n_steps))
        self.max_images = int(max_images)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every or trainer.global_rank != 0:
            return
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not isinstance(batch, Mapping):
            return
        try:
            panels = self.panels(pl_module, batch)
        except Exception as err:  # noqa: BLE001 - a drawing problem must never stop training
            log.warning("image panels failed: %s", err)
            return
        if panels:
            try:
                import wandb

                for name, images in panels.items():
                    loggers[0].experiment.log({f"images/{name}": [wandb.Image(im, caption=c) for c, im in images],
                                               "trainer/global_step": trainer.global_step})
            except Exception as err:  # noqa: BLE001 - e.g. pillow missing; never stop training for a picture
                log.warning("image panels not logged: %s", err)

    def panels(self, pl_module, batch: Mapping[str, Any]) -> dict[str, list[tuple[str, np.ndarray]]]:
        n = min(self.max_images, int(batch[pl_module.inputs[0]].shape[0]))
        sub = {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] >= n else v)
               for k, v in batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            extra = pl_module.panel_outputs(sub)
        finally:
            pl_module.train(was_training)
        names = getattr(pl_module, "channel_names", {}) or {}
        denorm = getattr(pl_module, "denormalize", None)
        keys = list(batch.get("key", [str(i) for i in range(n)]))[:n]
        out: dict[str, list[tuple[str, np.ndarray]]] = {}

        def phys(mod: str, x: torch.Tensor) -> torch.Tensor:
            if denorm is None:
                return x
            try:
                return denorm(mod, x)
            except Exception:  # noqa: BLE001 - e.g. a reconstruction of a modality the transforms do not know
                return x

        for mod in pl_module.inputs:
            x = sub[mod]
            draw = rgb_s2 if mod.startswith("s2") else false_colour_s1 if mod.startswith("s1") else None
            if draw is None:
                continue
            rows = []
            for i in range(n):
                tiles = [draw(phys(mod, x[i:i + 1])[0], names.get(mod, []))]
                for kind in ("masked", "recon"):
                    t = extra.get(f"{kind}/{mod}")
                    if t is not None:
                        tiles.append(draw(phys(mod, t[i:i + 1])[0], names.get(mod, [])))
                tiles = [t for t in tiles if t is not None]
                if tiles:
                    rows.append((f"{keys[i]}: " + (" | ".join(["input", "masked", "reconstruction"][:len(tiles)])),
                                 np.concatenate([_upsample(t, tiles[0].shape[0]) for t in tiles], 1)))
            if rows:
                out[mod] = rows
        if "pred" in extra and "label" in extra:
            pred, label = extra["pred"], extra["label"]
            rows = []
            for i in range(n):
                if pred.is_floating_point():
                    both = torch.stack([pred[i], label[i]], -1).float().cpu().numpy()
                    lo, hi = np.nanpercentile(both, [2, 98]) if np.isfinite(both).any() else (0.0, 1.0)
                    tiles = [np.repeat(_stretch_fixed(t, lo, hi)[..., None], 3, -1) for t in (both[..., 0],
                                                                                               both[..., 1])]
                else:
                    k = int(getattr(pl_module, "num_classes", int(pred.max()) + 1))
                    tiles = [_classes(pred[i], k), _classes(label[i], k)]
                rows.append((f"{keys[i]}: prediction | label", np.concatenate(tiles, 1)))
            out["prediction"] = rows
        return out


def _stretch_fixed(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
