"""The real ``pretrain_mae`` training step on one GPU, fed by the real loader vs the same step on a cached batch.

Per grid size (``--px``, the ``transforms.grid.size``), ONE run measures three variants of the same Lightning
``Trainer`` + ``PretrainTask`` (composed with Hydra from ``experiment=pretrain_mae``, built with
``m3leo_stream.train``'s builders), at the same per-GPU batch:

- ``fed``: ``trainer.fit(task, datamodule=M3LEODataModule)`` over local shards generated here (``shard_tools.synth``
  + ``shard_tools.build``): reading + decoding on the loader's threads, host→device copy, device transforms in
  ``on_after_batch_transfer``, the step;
- ``cached_raw``: one raw batch already on the device, reused every step, through the same device transforms (no
  I/O, no H2D copy);
- ``cached``: one batch already on the device AND transformed, reused every step: the pure-compute ceiling.

Step times are CUDA-event intervals between consecutive ``on_train_batch_end`` (one full training-loop iteration,
data wait included), after warm-up, with ``torch.cuda.synchronize`` around the timed window. Printed and written to
``bench/results/gpu_step_<device>.json``: samples/s, step time (median, p90), data share of a step
(1 − cached / fed, split into I/O + H2D and device transforms), ``TrainingSpeed``'s data-wait fraction, H2D bytes
per sample and GB/s, peak GPU memory, MFU (``FlopCounterMode`` FLOPs of one forward + backward / step time / peak
bf16 dense FLOP/s) and the host syncs per step (``torch.cuda.set_sync_debug_mode("warn")``, by call site).

    python bench/gpu_step.py                          # GPU: ViT-B/16, bf16-mixed, 224 and 448 px, largest batch
    python bench/gpu_step.py --px 224 --batch 256     # one grid, a given batch
    python bench/gpu_step.py                          # no CUDA: a tiny configuration (CI keeps it working)

Without CUDA it runs a tiny model (dim 32, depth 1, 2 heads, patch 8) on a 32 px grid, batch 4, fp32, a few steps:
the figures then say nothing about GPUs, only that the benchmark works.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_name  # noqa: E402

INPUTS = ("s1grd", "s2rgbm", "gssic")  # the inputs of experiment=pretrain_mae
REGIONS = ("conus", "europe")
PEAK_BF16_DENSE = [  # (substring of torch.cuda.get_device_name, FLOP/s); first match wins
    ("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
]
CPU_TINY = {"size": "custom", "dim": 32, "depth": 1, "heads": 2, "patch_size": 8, "decoder_dim": 32,
            "decoder_depth": 1, "decoder_heads": 2}
HOST_MEM_FRACTION = 0.6  # of MemAvailable that the loader's batches in flight may take (see _host_plan)


# --- data ------------------------------------------------------------------------------------------------------

def make_shards(work: Path, chips: int, workers: int) -> Path:
    """``chips`` generated chips (two regions, the pretraining inputs) built into a shard root under ``work``."""
    from shard_tools.build import BuildConfig, build
    from shard_tools.synth import SynthConfig, synth

    src, root = work / "src", work / "shards"
    per_region = max(1, chips // len(REGIONS))
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("num_samples") == per_region * len(REGIONS):
        print(f"data: reusing the {per_region * len(REGIONS)} chips of {root}", flush=True)
        return root
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    synth(SynthConfig(str(src), REGIONS, per_region, seed=0, modalities=INPUTS), workers=workers, progress=False)
    build(BuildConfig(str(src), str(root), workers=workers, progress=False))
    shutil.rmtree(src)  # the shards are all the benchmark reads
    print(f"data: {per_region * len(REGIONS)} generated chips built into {root} in {time.perf_counter() - t:.0f} s",
          flush=True)
    return root


def compose_cfg(a: argparse.Namespace, root: Path, px: int, batch: int, steps_total: int, workers: int,
                prefetch: int):
    from hydra import compose, initialize_config_dir

    from m3leo_stream.train import CONFIG_DIR

    over = [
        "experiment=pretrain_mae", f"data.root={root}", f"data.batch_size={batch}", f"data.num_workers={workers}",
        f"data.prefetch_factor={prefetch}", f"transforms.grid.size={px}", f"trainer.precision={a.precision}",
        f"trainer.accelerator={'gpu' if a.cuda else 'cpu'}", "trainer.devices=1", "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", f"trainer.max_steps={steps_total}",
        "trainer.max_epochs=-1", "logger.wandb.mode=disabled", "resume=null", f"run_dir={a.work}/run",
        "checkpoint.every_n_train_steps=0", "checkpoint.monitor=null",
        # one epoch covers the whole run (no epoch boundary in the timed window); batches larger than the train
        # split repeat chips (the planner up-samples), each repeat read and decoded again
        f"data.samples_per_epoch={batch * (steps_total + 2)}",
    ]
    if a.size == "cpu-tiny":
        over += [f"model.{k}={v}" for k, v in CPU_TINY.items()]
    else:
        over += [f"model.size={a.size}"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", over)


def tensor_bytes(batch: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def read_raw_batch(cfg) -> dict[str, Any]:
    """One training batch as the loader hands it to Lightning (host tensors, pinned when CUDA is present)."""
    from m3leo_stream.train import build_datamodule

    assert int(cfg.data.num_workers) == 0  # read on the spot: no read-ahead threads left holding batches
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if torch.cuda.is_available() and dm.pin_memory:
        batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) and not v.is_pinned() else v)
                 for k, v in batch.items()}
    return batch


def to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def tile(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """``batch`` repeated along the batch dimension to ``n`` rows (for the batch-size search only)."""
    b = len(batch["key"])
    k = -(-n // b)
    out: dict[str, Any] = {}
    for key, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b:
            out[key] = v.repeat((k,) + (1,) * (v.dim() - 1))[:n]
        elif isinstance(v, list) and len(v) == b:
            out[key] = (v * k)[:n]
        else:
            out[key] = v
    return out


# --- one fit -------------------------------------------------------------------------------------------------------

class Cached:
    """``n`` times the same batch (already on the device) as a Lightning train dataloader."""

    def __init__(self, batch: dict[str, Any], n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch

    def __len__(self) -> int:
        return self.n


def cached_datamodule(batch: dict[str, Any], n: int, transforms_of=None):
    """A DataModule yielding the cached ``batch``; with ``transforms_of`` (the real M3LEODataModule) its
    ``on_after_batch_transfer`` (the device transforms) runs on every step, exactly as in the fed run."""
    import lightning.pytorch as pl

    class CachedData(pl.LightningDataModule):
        def train_dataloader(self):
            return Cached(batch, n)

        def on_after_batch_transfer(self, b, dataloader_idx):
            if transforms_of is None:
                return b
            transforms_of.trainer = self.trainer
            return transforms_of.on_after_batch_transfer(b, dataloader_idx)

    return CachedData()


class Plan:
    """Which steps are warm-up, timed, and sync-counted."""

    def __init__(self, warmup: int, steps: int, sync_steps: int):
        self.warmup, self.steps, self.sync_steps = warmup, steps, sync_steps

    @property
    def total(self) -> int:
        return self.warmup + self.steps + self.sync_steps


def make_recorder(plan: Plan, cuda: bool):
    """Two callbacks around ``TrainingSpeed(every_n_steps=plan.steps)``:

    - ``timer`` (before it): times steps ``warmup+1 .. warmup+steps`` with CUDA events (``perf_counter`` on CPU) at
      each ``on_train_batch_end``, ``torch.cuda.synchronize`` at both ends of the window. Running before
      TrainingSpeed, its synchronize calls fall outside TrainingSpeed's data-wait intervals;
    - ``tail`` (after it): reads what TrainingSpeed logged at the window's last step (its window is then exactly
      the timed one: warm-up is a multiple of ``steps``), then counts host syncs over the next ``sync_steps`` whole
      iterations (fetch, H2D, transforms, step, callbacks) with ``torch.cuda.set_sync_debug_mode("warn")``.
    """
    import lightning.pytorch as pl

    last = plan.warmup + plan.steps

    class Timer(pl.Callback):
        def __init__(self):
            self.marks: list[Any] = []
            self.window_s: float | None = None
            self._t0 = 0.0

        def _mark(self):
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.marks.append(ev)
            else:
                self.marks.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == plan.warmup:
                if cuda:
                    torch.cuda.synchronize()
                self._t0 = time.perf_counter()
                self._mark()
            elif plan.warmup < step <= last:
                self._mark()
                if step == last:
                    if cuda:
                        torch.cuda.synchronize()
                    self.window_s = time.perf_counter() - self._t0

        def step_seconds(self) -> list[float]:
            if cuda:
                torch.cuda.synchronize()
                return [x.elapsed_time(y) / 1e3 for x, y in zip(self.marks, self.marks[1:])]
            return [y - x for x, y in zip(self.marks, self.marks[1:])]

    class Tail(pl.Callback):
        def __init__(self):
            self.speed: dict[str, float] = {}
            self.syncs: list[str] = []
            self._warn = None
            self._caught: list[Any] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == last:
                m = trainer.callback_metrics
                self.speed = {k: float(m[f"perf/{k}"]) for k in ("data_wait_frac", "step_time_s",
                                                                  "samples_per_s_per_device") if f"perf/{k}" in m}
                if cuda and plan.sync_steps:
                    torch.cuda.synchronize()
                    self._warn = warnings.catch_warnings(record=True)
                    self._caught = self._warn.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
            elif self._warn is not None and step >= plan.total:
                self._stop()

        def _stop(self):
            torch.cuda.set_sync_debug_mode("default")
            self._warn.__exit__(None, None, None)
            self._warn = None
            self.syncs += [f"{_short(w.filename)}:{w.lineno}" for w in self._caught
                           if "synchroniz" in str(w.message).lower()]

        def on_exception(self, trainer, pl_module, exception):
            if self._warn is not None:
                self._stop()

    return Timer(), Tail()


def _short(path: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def fit(a: argparse.Namespace, cfg, variant: str, plan: Plan, batch: dict[str, Any] | None = None,
        record: bool = True) -> dict[str, Any]:
    """One ``trainer.fit`` of the real task in ``variant`` (fed | cached_raw | cached)."""
    import lightning.pytorch as pl

    from m3leo_stream.callbacks import TrainingSpeed
    from m3leo_stream.config import plain
    from m3leo_stream.train import build_datamodule, build_task, describe_data

    pl.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    info, _ = describe_data(cfg, dm)
    task = build_task(cfg, info)
    timer, tail = make_recorder(plan, a.cuda)
    tcfg = plain(cfg.trainer)
    tcfg.update(enable_checkpointing=False, enable_model_summary=False)
    trainer = pl.Trainer(**tcfg, logger=False, callbacks=[timer, TrainingSpeed(plan.steps), tail],
                         default_root_dir=str(a.work))
    if a.cuda:
        torch.cuda.reset_peak_memory_stats()
    n = plan.total + 2
    try:
        if variant == "fed":
            trainer.fit(task, datamodule=dm)
        elif variant == "cached_raw":
            trainer.fit(task, datamodule=cached_datamodule(batch, n, transforms_of=dm))
        elif variant == "cached":
            trainer.fit(task, datamodule=cached_datamodule(batch, n))
        else:
            raise ValueError(variant)
        if not record:
            return {}
        if trainer.global_step != plan.total:
            raise RuntimeError(f"{variant}: ran {trainer.global_step} steps, expected {plan.total}")
        steps = timer.step_seconds()
        bsz = int(cfg.data.batch_size)
        med = statistics.median(steps)
        res = {
            "steps_timed": len(steps), "step_s": steps, "step_s_median": med,
            "step_s_p90": _quantile(steps, 0.9), "samples_per_s": bsz * len(steps) / timer.window_s,
            "window_s": timer.window_s, "training_speed": tail.speed,
            "data_wait_frac": tail.speed.get("data_wait_frac"),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if a.cuda else None,
        }
        if a.cuda and plan.sync_steps:
            res["syncs_per_step"] = len(tail.syncs) / plan.sync_steps
            res["sync_sites"] = {k: v / plan.sync_steps for k, v in Counter(tail.syncs).most_common()}
        else:
            res["syncs_per_step"] = None
            res["sync_sites"] = None
        return res
    finally:
        del trainer, task, dm, timer, tail
        _free(a)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _free(a: argparse.Namespace) -> None:
    gc.collect()
    if a.cuda:
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


# --- figures around the fits ------------------------------------------------------------------------------------

def model_flops(a: argparse.Namespace, cfg, batch: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward + backward of the task's model on ``batch`` (transformed, on the device), counted by
    ``FlopCounterMode`` under the step's autocast; the optimiser step is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from m3leo_stream.train import build_datamodule, build_task, describe_data

    info, _ = describe_data(cfg, build_datamodule(cfg))
    task = build_task(cfg, info).to(a.device)
    task.train()
    bf16 = str(a.precision).startswith("bf16")
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = task.model(batch)
        out["loss"].backward()
    total = int(fc.get_total_flops())
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    del task, out
    _free(a)
    return total, by_op


def h2d_copy_gbps(a: argparse.Namespace, host: dict[str, Any], reps: int = 3) -> float | None:
    """GB/s of copying the loader's (pinned) host batch to the device alone, as Lightning does (non_blocking)."""
    if not a.cuda:
        return None
    nbytes = tensor_bytes(host)
    to_device(host, a.device)  # warm-up
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        dev = to_device(host, a.device)
    t1.record()
    torch.cuda.synchronize()
    del dev
    _free(a)
    return nbytes * reps / (t0.elapsed_time(t1) / 1e3) / 1e9


def peak_flops(a: argparse.Namespace) -> tuple[float | None, str]:
    if a.peak_flops:
        return float(a.peak_flops), "--peak-flops"
    if not a.cuda:
        return None, "unknown (CPU)"
    name = torch.cuda.get_device_name(a.device)
    for key, value in PEAK_BF16_DENSE:
        if key.lower() in name.lower():
            return value, f"table: {key} bf16 dense"
    return None, f"unknown device {name!r} (give --peak-flops)"


def mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def host_plan(a: argparse.Namespace, batch: int, bytes_per_sample: int) -> tuple[int, int, int, str | None]:
    """(batch, workers, prefetch_factor, note): the thread-mode loader keeps ``workers × prefetch + 3`` batches
    alive (its buffer pool; README "Streaming") and, with CUDA, a pinned copy of those in flight, so that is
    estimated as up to twice as many. If that exceeds ``HOST_MEM_FRACTION`` of the available host memory, the
    prefetch factor drops to 1, then the workers, then (auto batch only) the batch halves."""
    budget = HOST_MEM_FRACTION * mem_available()
    copies = 2 if a.cuda else 1
    workers, prefetch = a.workers, a.prefetch

    def need(b: int, w: int, p: int) -> float:
        return (w * p + 3) * copies * b * bytes_per_sample

    notes = []
    if need(batch, workers, prefetch) > budget and prefetch > 1:
        prefetch = 1
        notes.append("prefetch_factor 1")
    while need(batch, workers, prefetch) > budget and workers > 1:
        workers -= 1
    if workers != a.workers:
        notes.append(f"{workers} loader workers")
    if need(batch, workers, prefetch) > budget:
        if a.batch:
            notes.append(f"batch {batch} exceeds the host-memory estimate; kept (given by --batch)")
        else:
            while batch > 1 and need(batch, workers, prefetch) > budget:
                batch //= 2
            notes.append(f"batch {batch}")
    note = None
    if notes:
        note = (f"host memory: the loader's batches in flight would need more than {HOST_MEM_FRACTION:.0%} of "
                f"{mem_available() / 2**30:.0f} GiB available at {bytes_per_sample / 1e6:.1f} MB/sample; using "
                + ", ".join(notes))
    return batch, workers, prefetch, note


def search_batch(a: argparse.Namespace, root: Path, px: int) -> dict[str, Any]:
    """Largest power-of-two batch whose ``cached_raw`` step (the fed run's device memory: raw batch + transforms +
    step) runs 2 steps without CUDA OOM, doubling from ``--min-batch``."""
    base_cfg = compose_cfg(a, root, px, a.min_batch, 2, 0, 1)
    base = to_device(read_raw_batch(base_cfg), a.device)
    tried: dict[int, bool] = {}
    b = a.min_batch
    while b <= a.max_batch:
        cfg = compose_cfg(a, root, px, b, 2, 0, 1)
        raw = tile(base, b)
        ok = False
        try:
            fit(a, cfg, "cached_raw", Plan(1, 1, 0), raw, record=False)
            ok = True
        except Exception as err:  # noqa: BLE001 - only OOM ends the search
            if not _is_oom(err):
                raise
        del raw
        _free(a)
        tried[b] = ok
        print(f"  batch {b}: {'fits' if ok else 'CUDA out of memory'}", flush=True)
        if not ok:
            break
        b *= 2
    fits = [k for k, v in tried.items() if v]
    del base
    _free(a)
    if not fits:
        raise SystemExit(f"{px} px: even batch {a.min_batch} does not fit")
    return {"tried": tried, "largest_fit": max(fits)}


# --- one grid size ----------------------------------------------------------------------------------------------

def measure(a: argparse.Namespace, root: Path, px: int) -> dict[str, Any]:
    run: dict[str, Any] = {"px": px, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if a.batch:
        batch, run["batch_source"] = a.batch, "--batch"
    elif a.cuda:
        print(f"{px} px: batch search (cached raw batch + device transforms, doubling from {a.min_batch})",
              flush=True)
        run["batch_search"] = search_batch(a, root, px)
        batch, run["batch_source"] = run["batch_search"]["largest_fit"], "search"
    else:
        batch, run["batch_source"] = 4, "cpu default"
    while True:
        try:
            run.update(measure_at(a, root, px, batch))
            return run
        except Exception as err:  # noqa: BLE001 - an OOM the search did not foresee: halve (auto batch only)
            if not (_is_oom(err) and a.cuda and not a.batch and batch > 1):
                raise
        _free(a)  # here, not in the except block: its traceback still holds the failed run's tensors
        run.setdefault("oom_retries", []).append(batch)
        print(f"  {px} px: CUDA out of memory at batch {batch}; halving", flush=True)
        batch //= 2


def measure_at(a: argparse.Namespace, root: Path, px: int, batch: int) -> dict[str, Any]:
    plan = Plan(a.warmup_eff, a.steps, a.sync_steps if a.cuda else 0)
    probe_cfg = compose_cfg(a, root, px, batch, plan.total, 0, 1)
    host = read_raw_batch(probe_cfg)
    nbytes = tensor_bytes(host)
    per_sample = nbytes // batch
    batch2, workers, prefetch, note = host_plan(a, batch, per_sample)
    if batch2 != batch:
        print(f"  {note}", flush=True)
        host = read_raw_batch(compose_cfg(a, root, px, batch2, plan.total, 0, 1))
        batch, nbytes = batch2, tensor_bytes(host)
    cfg = compose_cfg(a, root, px, batch, plan.total, workers, prefetch)
    print(f"{px} px, batch {batch}: {nbytes / 1e9:.3f} GB per batch ({per_sample / 1e6:.2f} MB/sample), "
          f"{workers} loader workers, prefetch {prefetch}{'; ' + note if note else ''}", flush=True)
    copy_gbps = h2d_copy_gbps(a, host)
    raw = to_device(host, a.device)
    del host
    from m3leo_stream.train import build_datamodule

    dm = build_datamodule(cfg)
    dm.setup("fit")
    done = dm.device_transforms(train=True)(raw, step=0)
    flops, by_op = model_flops(a, cfg, done)
    attention = any("scaled_dot_product" in op or "bmm" in op for op in by_op)
    print(f"  model: {flops / 1e12:.4g} TFLOP per step (forward + backward, FlopCounterMode"
          f"{'' if attention else '; attention not counted: no FLOP formula for this SDPA kernel'})", flush=True)
    res: dict[str, Any] = {}
    res["cached"] = fit(a, cfg, "cached", plan, done)
    del done, dm
    _free(a)
    print(f"  cached: {res['cached']['step_s_median'] * 1e3:.1f} ms/step", flush=True)
    res["cached_raw"] = fit(a, cfg, "cached_raw", plan, raw)
    del raw
    _free(a)
    print(f"  cached raw + device transforms: {res['cached_raw']['step_s_median'] * 1e3:.1f} ms/step", flush=True)
    res["fed"] = fit(a, cfg, "fed", plan)
    print(f"  loader-fed: {res['fed']['step_s_median'] * 1e3:.1f} ms/step", flush=True)

    peak, _ = peak_flops(a)
    for r in res.values():
        r["tflops"] = flops / r["step_s_median"] / 1e12
        r["mfu"] = flops / r["step_s_median"] / peak if peak else None
    fed, cached, cached_raw = (res[k]["step_s_median"] for k in ("fed", "cached", "cached_raw"))
    out = {
        "batch": batch, "workers": workers, "prefetch_factor": prefetch, "host_memory_note": note,
        "bytes_per_batch": nbytes, "bytes_per_sample": nbytes / batch,
        "flops_per_step": flops, "flops_by_op": by_op, "flops_attention_counted": attention,
        "data_share": 1 - cached / fed,
        "data_share_io_h2d": (fed - cached_raw) / fed,
        "data_share_transforms": (cached_raw - cached) / fed,
        "h2d": {"bytes_per_batch": nbytes, "bytes_per_sample": nbytes / batch,
                "achieved_gbps": nbytes * res["fed"]["steps_timed"] / res["fed"]["window_s"] / 1e9,
                "copy_gbps": copy_gbps},
        **res,
    }
    return out


# --- report ----------------------------------------------------------------------------------------------------

def device_tag(a: argparse.Namespace) -> str:
    if not a.cuda:
        return "cpu"
    name = torch.cuda.get_device_name(a.device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def print_run(r: dict[str, Any]) -> None:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    def gib(x):
        return "n/a" if x is None else f"{x:.1f}"

    print(f"\n{r['px']} px, batch {r['batch']} ({r['batch_source']}), {r['workers']} loader workers")
    print(f"{'':<30} {'samples/s':>10} {'step ms med':>12} {'p90':>8} {'data wait':>10} {'peak GiB':>9} "
          f"{'TFLOP/s':>8} {'MFU':>7}")
    for key, label in (("fed", "loader-fed"), ("cached_raw", "cached raw + device transforms"),
                       ("cached", "cached (compute ceiling)")):
        x = r[key]
        print(f"{label:<30} {x['samples_per_s']:>10.1f} {x['step_s_median'] * 1e3:>12.1f} "
              f"{x['step_s_p90'] * 1e3:>8.1f} {pct(x['data_wait_frac']):>10} {gib(x['peak_mem_gib']):>9} "
              f"{x['tflops']:>8.2f} {pct(x['mfu']):>7}")
    print(f"data share of a step: {pct(r['data_share'])} (I/O + H2D {pct(r['data_share_io_h2d'])}, device "
          f"transforms {pct(r['data_share_transforms'])})")
    h = r["h2d"]
    copy = "n/a" if h["copy_gbps"] is None else f"{h['copy_gbps']:.1f} GB/s"
    print(f"H2D: {h['bytes_per_sample'] / 1e6:.2f} MB/sample, {h['bytes_per_batch'] / 1e9:.3f} GB/batch; "
          f"{h['achieved_gbps']:.2f} GB/s moved in the fed run; copy of one batch alone: {copy}")
    s = r["fed"]["syncs_per_step"]
    if s is None:
        print("host syncs per step: n/a (CUDA only)")
    else:
        sites = ", ".join(f"{k} ×{v}" for k, v in r["fed"]["sync_sites"].items())
        print(f"host syncs per step (fed): {s:.1f}{' — ' + sites if sites else ''}")
    print(f"model: {r['flops_per_step'] / 1e12:.4g} TFLOP per step (forward + backward)")


SAME_FOR_MERGE = ("model", "inputs", "precision", "warmup_steps", "timed_steps", "sync_steps", "chips")


def merge_earlier(res: dict[str, Any], out: Path) -> None:
    """Add to ``res`` the runs of ``out`` for grids not measured now, if ``out`` was written for the same device,
    versions and configuration; refuse otherwise (figures of different setups must not share a file)."""
    if not out.is_file():
        return
    old = json.loads(out.read_text())
    same = (old.get("device", {}).get("name") == res["device"]["name"] and old.get("versions") == res["versions"]
            and all(old.get("config", {}).get(k) == res["config"][k] for k in SAME_FOR_MERGE))
    if not same:
        raise SystemExit(f"--merge: {out} was written for another device, versions or configuration; "
                         "give another --out")
    now = {r["px"] for r in res["runs"]}
    res["runs"] = sorted([r for r in old["runs"] if r["px"] not in now] + res["runs"], key=lambda r: r["px"])
    res["config"]["px"] = [r["px"] for r in res["runs"]]
    res["wall_s"] += float(old.get("wall_s") or 0.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--px", type=int, nargs="+", help="training grid sides (default 224 448; CPU: 32)")
    p.add_argument("--batch", type=int, help="per-GPU batch (default: largest power of two that fits; CPU: 4)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 10; CPU: 3)")
    p.add_argument("--warmup", type=int, help="untimed first steps per variant, rounded up to a multiple of "
                   "--steps (default 10; CPU: 3)")
    p.add_argument("--sync-steps", type=int, default=3, help="steps after the timed ones with sync counting (CUDA)")
    p.add_argument("--workers", type=int, help="loader threads (default min(8, cores); CPU: 1)")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead per loader thread")
    p.add_argument("--chips", type=int, help="generated chips, two regions (default 256; CPU: 16)")
    p.add_argument("--size", help="ViT size (tiny|small|base|large) or cpu-tiny (default base; CPU: cpu-tiny)")
    p.add_argument("--precision", help="Lightning precision (default bf16-mixed; CPU: 32-true)")
    p.add_argument("--peak-flops", type=float, help="peak dense FLOP/s of the device for MFU (default: table)")
    p.add_argument("--min-batch", type=int, default=8, help="batch search: first size tried")
    p.add_argument("--max-batch", type=int, default=4096, help="batch search: largest size tried")
    p.add_argument("--root", help="use this shard root (with s1grd, s2rgbm, gssic) instead of generating one")
    p.add_argument("--work-dir", help="where to generate data and run (default: a temporary directory, removed)")
    p.add_argument("--out", help="results JSON (default bench/results/gpu_step_<device>.json)")
    p.add_argument("--merge", action="store_true", help="keep the runs of other --px already in --out when it was "
                   "written for the same device, versions and configuration (one grid per command)")
    a = p.parse_args(argv)
    a.cuda = torch.cuda.is_available()
    a.device = torch.device("cuda", torch.cuda.current_device()) if a.cuda else torch.device("cpu")
    gpu = a.cuda
    a.px = a.px or ([224, 448] if gpu else [32])
    a.steps = a.steps or (10 if gpu else 3)
    a.warmup = a.warmup if a.warmup is not None else (10 if gpu else 3)
    # TrainingSpeed logs every --steps steps: with warm-up a multiple of that, its last window is the timed one
    a.warmup_eff = -(-max(1, a.warmup) // a.steps) * a.steps
    a.workers = a.workers or (min(8, os.cpu_count() or 1) if gpu else 1)
    a.chips = a.chips or (256 if gpu else 16)
    a.size = a.size or ("base" if gpu else "cpu-tiny")
    a.precision = a.precision or ("bf16-mixed" if gpu else "32-true")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # the generated gssic rmse bands are constant; the library's warning about it would repeat for every fit
    logging.getLogger("m3leo_stream.transforms.bands").addFilter(lambda r: "has std" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*set_vital.*")
    os.environ.setdefault("WANDB_MODE", "disabled")

    own_work = a.work_dir is None
    a.work = Path(a.work_dir or tempfile.mkdtemp(prefix="m3leo-gpu-step-"))
    a.work.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(a.device) if gpu else f"CPU {cpu_name()} ({os.cpu_count()} cores)"
    print(f"device: {where}; torch {torch.__version__}; px {a.px}; size {a.size}; {a.precision}; warm-up "
          f"{a.warmup_eff}{f' (--warmup {a.warmup} rounded up)' if a.warmup_eff != a.warmup else ''}, "
          f"{a.steps} timed steps per variant", flush=True)
    import lightning

    t_start = time.perf_counter()
    try:
        root = Path(a.root) if a.root else make_shards(a.work, a.chips, max(1, min(os.cpu_count() or 1, 16)))
        from m3leo_stream.shard_root import ShardRoot

        manifest = ShardRoot(str(root)).manifest
        train = sum(int(s.get("train", 0)) for s in (manifest.get("splits") or {}).values())
        runs = [measure(a, root, px) for px in a.px]
    finally:
        if own_work:
            shutil.rmtree(a.work, ignore_errors=True)
    peak, peak_src = peak_flops(a)
    cfg = compose_cfg(a, root, a.px[0], 1, 1, 0, 1)
    from m3leo_stream.models.mae import vit_config

    model = {k: v for k, v in dict(cfg.model).items()}
    model.update(vit_config(str(cfg.model.size), cfg.model.dim, cfg.model.depth, cfg.model.heads))
    res: dict[str, Any] = {
        "bench": "gpu_step", "experiment": "pretrain_mae",
        "device": {"type": a.device.type, "name": where, "tag": device_tag(a), "peak_flops": peak,
                   "peak_flops_source": peak_src, "count": torch.cuda.device_count() if gpu else 0},
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "host": {"cpus": os.cpu_count(), "mem_available_gib": mem_available() / 2**30, "node": platform.node(),
                 "load_avg_1m_at_end": os.getloadavg()[0]},
        "config": {"px": a.px, "model": model, "inputs": list(cfg.data.inputs), "precision": a.precision,
                   "warmup_steps": a.warmup_eff, "timed_steps": a.steps, "sync_steps": a.sync_steps if gpu else 0,
                   "chips": int(manifest.get("num_samples") or 0), "train_chips": train,
                   "data": "generated (shard_tools.synth + build)" if not a.root else str(a.root),
                   "tiny_cpu_config": a.size == "cpu-tiny"},
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
    }
    if not gpu:
        res["note"] = ("no CUDA: the tiny CPU configuration ran (the benchmark works); GPU figures unmeasured, "
                       "MFU, peak GPU memory, host syncs and H2D copy speed n/a")
    for r in runs:
        print_run(r)
    if not gpu:
        print("\n" + res["note"])
    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"gpu_step_{device_tag(a)}.json"
    if a.merge:
        merge_earlier(res, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
