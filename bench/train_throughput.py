"""Training throughput of ``pretrain_mae`` from local shards: samples/s per device and the data-wait fraction.

Two measurements side by side in ONE run (this machine is noisy, so the comparison is a ratio):

- ``pipeline``: the real thing — ``trainer.fit`` of the experiment over the shards (loader workers read + decode,
  device transforms in ``on_after_batch_transfer``, MAE step), timed by the TrainingSpeed callback;
- ``compute``: the same Trainer over ONE cached, already transferred batch repeated (no reading, no decoding, no
  transforms): the step-time floor of the model alone.

``pipeline / compute`` samples/s is the fraction of the model's speed the data path delivers; the data-wait fraction
is (time from the end of one step to the start of the next) / (full step time), measured in the pipeline run after
``--warmup`` steps.

CPU (default, what CI machines have): a small model on a 64 px grid so it finishes in minutes, the run says "CPU".
GPU: ``--device cuda --size base --patch 16 --grid 448 --precision bf16-mixed --batch-size auto`` doubles the batch
until it no longer fits and measures the largest that does (ViT-B/16, bf16).

    python bench/train_throughput.py --root demo-data/shards
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_name  # noqa: E402


def _cfg(args, batch_size: int):
    from hydra import compose, initialize_config_dir

    from m3leo_stream.train import CONFIG_DIR

    over = [
        "experiment=pretrain_mae", f"data.root={args.root}", f"data.batch_size={batch_size}",
        f"data.num_workers={args.workers}", f"data.worker_mode={args.worker_mode}",
        f"transforms.grid.size={args.grid}", f"model.size={args.size}",
        f"model.patch_size={args.patch}", f"trainer.precision={args.precision}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "trainer.devices=1",
        "trainer.enable_progress_bar=false", "logger.wandb.mode=disabled", "trainer.limit_val_batches=0",
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.max_epochs=-1", "resume=null",
        f"run_dir={args.run_dir}", "checkpoint.every_n_train_steps=0", "checkpoint.monitor=null",
    ]
    if args.size == "custom":
        over += [f"model.dim={args.dim}", f"model.depth={args.depth}", f"model.heads={args.heads}",
                 f"model.decoder_dim={args.dim}", "model.decoder_depth=1", f"model.decoder_heads={args.heads}"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", over)


class _Recorder:
    """Per-step (wait, step) times after warm-up."""

    def __init__(self, warmup: int):
        import lightning.pytorch as pl

        rec = self

        class CB(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                now = time.perf_counter()
                if rec.last_end is not None:
                    rec.wait.append(now - rec.last_end)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                now = time.perf_counter()
                if rec.last_end is not None:
                    rec.step.append(now - rec.last_end)
                rec.last_end = now

        self.cb = CB()
        self.warmup = warmup
        self.last_end = None
        self.wait: list[float] = []
        self.step: list[float] = []

    def result(self, batch_size: int) -> dict[str, float]:
        w, s = self.wait[self.warmup:], self.step[self.warmup:]
        total = sum(s)
        return {"steps": len(s), "step_s": total / max(1, len(s)),
                "samples_per_s_per_device": batch_size * len(s) / total,
                "data_wait_frac": sum(w) / total}


def _fit(args, batch_size: int, cached: bool) -> dict[str, float]:
    import lightning.pytorch as pl

    from m3leo_stream.train import build_datamodule, build_task, describe_data

    cfg = _cfg(args, batch_size)
    pl.seed_everything(0)
    dm = build_datamodule(cfg)
    info, _ = describe_data(cfg, dm)
    task = build_task(cfg, info)
    rec = _Recorder(args.warmup)
    trainer = pl.Trainer(**{**dict(cfg.trainer), "enable_checkpointing": False}, logger=False, callbacks=[rec.cb])
    if not cached:
        trainer.fit(task, datamodule=dm)
        return rec.result(batch_size)
    # one real batch through the loader and the device transforms, then repeated from memory
    dm.trainer = None
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    t = dm.device_transforms(train=True)
    dev = torch.device(args.device)
    raw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in raw.items()}
    batch = t(raw, step=0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(5):
        t(raw, step=i + 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    transforms_s = (time.perf_counter() - t0) / 5
    n = args.warmup + args.steps

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(n):
                yield batch

    loader = torch.utils.data.DataLoader(Repeat(), batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    return {**rec.result(batch_size), "device_transforms_s_per_batch": transforms_s}


def _largest_batch(args) -> int:
    b, best = 8, None
    while b <= 4096:
        try:
            args_small = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": 2})
            _fit(args_small, b, cached=True)
            best = b
            b *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best is None:
        raise SystemExit("even batch 8 does not fit")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="shard root (local path)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="custom", help="tiny|small|base|large|custom (custom: --dim/--depth/--heads)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--grid", type=int, default=64, help="training grid side (px); 448 = native")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--batch-size", default="8", help="an integer or 'auto' (largest power of two that fits; GPU)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-mode", default="thread", choices=("thread", "process"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--run-dir", default="/tmp/m3leo-bench-run")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("WANDB_MODE", "disabled")
    bs = _largest_batch(args) if args.batch_size == "auto" else int(args.batch_size)
    compute = _fit(args, bs, cached=True)
    pipeline = _fit(args, bs, cached=False)
    where = f"CPU {cpu_name()} ({os.cpu_count()} cores)" if args.device == "cpu" else torch.cuda.get_device_name(0)
    res = {
        "device": where, "experiment": "pretrain_mae", "model": {"size": args.size, "dim": args.dim,
                                                                "depth": args.depth, "heads": args.heads,
                                                                "patch": args.patch},
        "load_avg_1m_at_end": os.getloadavg()[0],
        "grid_px": args.grid, "precision": args.precision, "batch_size": bs, "workers": args.workers,
        "worker_mode": args.worker_mode,
        "steps_measured": args.steps, "compute_only": compute, "pipeline": pipeline,
        "pipeline_over_compute": pipeline["samples_per_s_per_device"] / compute["samples_per_s_per_device"],
    }
    print(f"pretrain_mae on {where}: batch {bs}, grid {args.grid}px, {args.precision}, "
          f"{args.workers} workers ({args.worker_mode} mode)")
    print(f"{'':>14} {'samples/s/device':>17} {'step s':>8} {'data wait':>10}")
    for name, r in (("compute only", compute), ("pipeline", pipeline)):
        print(f"{name:>14} {r['samples_per_s_per_device']:>17.2f} {r['step_s']:>8.3f} {r['data_wait_frac']:>10.1%}")
    print(f"pipeline / compute = {res['pipeline_over_compute']:.2f}; device transforms alone "
          f"{compute['device_transforms_s_per_batch']:.3f} s/batch on {args.device} (inside the pipeline's data wait)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
