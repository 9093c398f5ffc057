"""Training callbacks: throughput and data-wait, device memory, loader metrics, image panels, key recording, and
the fitting of their intervals to a run's length."""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint

from m3leo_stream import render
from m3leo_stream.modalities import REGISTRY, Modality, Registry

log = logging.getLogger(__name__)

__all__ = ["BestCheckpoint", "LastCheckpoint", "ImagePanels", "KeyRecorder", "LoaderMetricsLog", "ProgressLog",
           "Periodic", "RunLengthIntervals", "TrainingSpeed", "interval_for_run"]


def interval_for_run(every: int, total_steps: float, points: int) -> int:
    """``every``, shortened so that a run of ``total_steps`` optimizer steps gets at least ``points`` of them;
    unchanged for a run that is long enough or of unknown length (``inf``)."""
    if not math.isfinite(total_steps) or total_steps <= 0:
        return every
    return max(1, min(every, int(total_steps) // max(1, points)))


class Periodic(Protocol):
    """A callback that acts every ``every`` training steps."""

    every: int


class RunLengthIntervals(pl.Callback):
    """Fits logging intervals to the run once its length is known (Lightning's ``estimated_stepping_batches``:
    ``max_steps``, or ``max_epochs`` × batches): Lightning's ``log_every_n_steps`` is cut to give the training
    curve at least ``curve_points`` points, and each callback in ``points`` (anything with an ``every`` attribute)
    at least its number of points, so a 100-step fine-tune still draws its curve and its image panels. Long runs
    keep the configured intervals."""

    def __init__(self, points: list[tuple[Periodic, int]], curve_points: int = 20):
        self.points = points
        self.curve_points = int(curve_points)

    def on_train_start(self, trainer, pl_module) -> None:
        total = float(trainer.estimated_stepping_batches)
        curve = interval_for_run(trainer.log_every_n_steps, total, self.curve_points)
        if curve != trainer.log_every_n_steps:
            log.info("a run of %d steps: logging every %d steps (log_every_n_steps %d)", int(total), curve,
                     trainer.log_every_n_steps)
            trainer.log_every_n_steps = curve
        for cb, n in self.points:
            cb.every = interval_for_run(cb.every, total, n)


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


class LoaderMetricsLog(pl.Callback):
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


class ProgressLog(pl.Callback):
    """A log line every ``every_n_steps`` training steps and at the last: step of max, the progress-bar metrics
    (loss) and steps/s since the previous line. For runs without a progress bar (batch jobs, the demo)."""

    def __init__(self, every_n_steps: int = 50):
        self.every = max(1, int(every_n_steps))
        self._last: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and not (trainer.max_steps > 0 and step >= trainer.max_steps):
            return
        now = time.perf_counter()
        t0, s0 = self._last or (now, step)
        self._last = (now, step)
        parts = [f"{k} {float(v):.4g}" for k, v in trainer.progress_bar_metrics.items()]
        if now > t0 and step > s0:
            parts.append(f"{(step - s0) / (now - t0):.2f} steps/s")
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        log.info("step %d%s (epoch %d): %s", step, total, trainer.current_epoch, ", ".join(parts))


class LastCheckpoint(pl.Callback):
    """Write ``path`` (the run's ``last.ckpt``, any fsspec URL) inside the training loop every ``every_n_steps``
    steps and at the last step (``max_steps``), and at the end of training when fitting stopped otherwise
    (``max_epochs``: the epoch is then really finished).

    Why not ModelCheckpoint(save_last=True): Lightning 2.6 also writes ``last`` in ``on_train_end`` when it has not
    saved one yet, i.e. AFTER the loop, and a checkpoint written after the loop records the epoch as finished, so a
    run stopped by ``max_steps`` mid-epoch and resumed from it would skip the rest of that epoch.

    ``started_at_step`` is the global step fitting started at; None when the loop did not run (a resume that is at
    ``max_steps`` already)."""

    def __init__(self, path: str, every_n_steps: int | None = None):
        self.path = path
        self.every = int(every_n_steps or 0)
        self._saved_step = -1
        self._recorded_best: frozenset[str] | None = None  # the best files last.ckpt records; None: no last.ckpt
        self.started_at_step: int | None = None

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step
        self._recorded_best = _best_files(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self.started_at_step = trainer.global_step
        if trainer.ckpt_path:  # resumed: the checkpoint records what was restored
            self._recorded_best = _best_files(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._saved_step:
            return
        if (trainer.max_steps > 0 and step >= trainer.max_steps) or (self.every and step % self.every == 0):
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer)

    def refresh(self, trainer) -> None:
        """Write ``path`` again if the best checkpoints it records are no longer the current ones (one was written
        or removed since it was saved): a run resumed from it then names a best checkpoint that exists."""
        if self._recorded_best is not None and _best_files(trainer) != self._recorded_best:
            self._save(trainer)


def _best_files(trainer) -> frozenset[str]:
    return frozenset(p for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                     for p in (*cb.best_k_models, cb.best_model_path) if p)


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint of the ``save_top_k`` best that keeps the run's ``last.ckpt`` (``last``) in step with it:
    after each validation ``last`` is refreshed (:meth:`LastCheckpoint.refresh`), and a record restored from a
    checkpoint forgets the files that are no longer there (a run resumed from an older ``last.ckpt`` after a
    crash), so the best checkpoint it reports is always a file that exists."""

    def __init__(self, last: LastCheckpoint, **kwargs: Any):
        super().__init__(**kwargs)
        self.last = last

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():
            # the directory is the run's own: its run id, last.ckpt and best files are what resume=auto goes on from
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self.last.refresh(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        fs = getattr(self, "_fs", None) or get_filesystem(self.dirpath or "")
        gone = [p for p in self.best_k_models if not fs.exists(p)]
        if self.best_model_path and not fs.exists(self.best_model_path):
            gone.append(self.best_model_path)
        if not gone:
            return
        for p in gone:
            self.best_k_models.pop(p, None)
        if self.best_k_models:
            worst, best = (max, min) if self.mode == "min" else (min, max)
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.__getitem__)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
            self.best_model_path = best(self.best_k_models, key=self.best_k_models.__getitem__)
            self.best_model_score = self.best_k_models[self.best_model_path]
        else:
            self.kth_best_model_path = self.best_model_path = ""
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
            self.best_model_score = None
        log.info("best checkpoints the resumed checkpoint records but that are gone: %s; the best is %s",
                 sorted(set(gone)), self.best_model_path or "none yet")


class KeyRecorder(pl.Callback):
    """Append ``<epoch>\\t<global_step>\\t<key>`` per consumed training sample to ``<dir>/rank<global_rank>.tsv``
    (flushed every batch). Padding rows (``valid`` False) are not recorded."""

    def __init__(self, directory: str):
        self.directory = str(directory)
        self._f: TextIO | None = None

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


class ImagePanels(pl.Callback):
    """Every ``every_n_steps`` training steps, log up to ``max_images`` panels of the current (transformed) batch
    to W&B, ``size`` pixels high: each input as :func:`m3leo_stream.render.picture` draws it (in physical units via
    the transforms' ``denormalize``) next to the task's masked input and reconstruction, or the prediction next to
    the label in the target's palette or colormap. Needs a WandbLogger; does nothing otherwise."""

    def __init__(self, every_n_steps: int = 500, max_images: int = 4, size: int = 256):
        self.every = max(1, int(every_n_steps))
        self.max_images = int(max_images)
        self.size = int(size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every or trainer.global_rank != 0:
            return
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not isinstance(batch, Mapping):
            return
        try:
            panels = self.panels(pl_module, batch, getattr(trainer.datamodule, "modalities", None))
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

    def panels(self, pl_module, batch: Mapping[str, Any],
               modalities: Registry | Mapping[str, Modality] | None = None) -> dict[str, list[tuple[str, np.ndarray]]]:
        """``{panel name: [(caption, (size, k * size, 3) uint8 image)]}`` for the first ``max_images`` samples;
        ``modalities``: the data's registry (default: the built-in one)."""
        mods = REGISTRY if modalities is None else modalities
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

        def phys(mod: str, x: torch.Tensor) -> np.ndarray:  # (B, C, H, W) in physical units
            if denorm is not None:
                try:
                    x = denorm(mod, x)
                except Exception:  # noqa: BLE001 - e.g. a reconstruction of a modality the transforms do not know
                    pass
            return x.float().cpu().numpy()

        def draw(m: Modality, x: np.ndarray) -> np.ndarray | None:
            channels = names.get(m.name) or list(m.bands)[:x.shape[0]]
            known = [i for i, c in enumerate(channels) if c in m.bands]  # derived channels (ratios, sin/cos) aside
            if not known:
                return None
            return render.upsample(render.picture(m, x[known], [channels[i] for i in known], "physical"), self.size)

        for mod in pl_module.inputs:
            if mod not in mods:
                continue
            m = mods[mod]
            rows = []
            for i in range(n):
                first = draw(m, phys(mod, sub[mod][i:i + 1])[0])
                if first is None:  # no stored band among the channels (one-hot classes)
                    break
                tiles, what = [first], ["input"]
                for kind, label in (("masked", "masked"), ("recon", "reconstruction")):
                    t = extra.get(f"{kind}/{mod}")
                    tile = draw(m, phys(mod, t[i:i + 1])[0]) if t is not None else None
                    if tile is not None:
                        tiles.append(tile)
                        what.append(label)
                rows.append((f"{keys[i]}: " + " | ".join(what), np.concatenate(tiles, 1)))
            if rows:
                out[mod] = rows
        if "pred" in extra and "label" in extra:
            out["prediction"] = self._prediction_rows(pl_module, extra["pred"], extra["label"], keys, n, mods)
        return out

    def _prediction_rows(self, pl_module, pred: torch.Tensor, label: torch.Tensor, keys: list[str], n: int,
                         mods: Registry | Mapping[str, Modality]) -> list[tuple[str, np.ndarray]]:
        """Prediction | label per sample: class indices in the target's palette, values through its colormap
        over one range for both."""
        info = getattr(pl_module, "data_info", None)
        target = mods.get(info.target) if info is not None and info.target else None
        rows = []
        for i in range(n):
            p, y = pred[i].cpu().numpy(), label[i].float().cpu().numpy()
            if pred.is_floating_point():
                cmap = target.display.colormap if target is not None else "viridis"
                both = np.stack([p.astype(np.float32), y])
                lo_hi = render.stretch_range(both, target.display.value_range if target is not None else None)
                tiles = [render.colormap_rgb(t, cmap, lo_hi) for t in both]
            else:
                k = int(getattr(pl_module, "num_classes", int(pred.max()) + 1))
                fits = target is not None and target.is_categorical and len(target.class_codes) == k
                palette = render.class_palette(target) if target is not None and fits else render.class_palette(k)
                tiles = [render.classes_rgb(p, palette), render.classes_rgb(y, palette)]
            rows.append((f"{keys[i]}: prediction | label",
                         np.concatenate([render.upsample(t, self.size) for t in tiles], 1)))
        return rows
