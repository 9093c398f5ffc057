"""Training entry point: ``python -m m3leo_stream.train experiment=<name> [hydra overrides]``.

Builds the DataModule (shards → device transforms), the task (MAE pretraining, segmentation, regression), W&B
logging (offline when no API key is configured; ``WANDB_MODE`` wins), checkpoints (last + best, to any fsspec URL)
and resumes (``resume=auto``: the latest checkpoint of ``checkpoint.dir``, restoring model, optimiser, scheduler,
loader position and the W&B run). On SIGUSR1 (Slurm's warning before the time limit) it checkpoints at the next
optimizer-step boundary and requeues the job (``m3leo_stream.requeue``); the requeued job resumes from it.
Configs: ``m3leo_stream/configs/`` (README "Training").
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_args

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from m3leo_stream.config import ConfigError, WandbMode, plain, register, validate
from m3leo_stream.configs import CONFIG_DIR
from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.requeue import RequeueOnSignal
from m3leo_stream.tasks import BaseTask, DataInfo

log = logging.getLogger("m3leo_stream.train")

register()  # the configs' schemas (m3leo_stream.config)
RUN_ID_FILE = "wandb_run_id.txt"
_SECRET = re.compile(r"(api_?key|secret|token|password|passwd|credential|^key$)", re.IGNORECASE)


# --- small helpers -----------------------------------------------------------------------------------------------

def scrub(obj: Any) -> Any:
    """A copy of ``obj`` with values of secret-looking keys (api keys, secrets, tokens, S3 keys) replaced."""
    if isinstance(obj, Mapping):
        return {k: ("***" if _SECRET.search(str(k)) and v is not None else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def _fs(url: str, storage_options: Mapping[str, Any] | None = None):
    from m3leo_stream.storage import get_fs

    return get_fs(url, dict(storage_options or {}))


def _join(a: str, b: str) -> str:
    return a.rstrip("/") + "/" + b


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def resolve_resume(resume: Any, ckpt_dir: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """``auto`` → the newest of ``<ckpt_dir>/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` Lightning writes there on a
    Slurm requeue signal (None when there is none), ``null`` → None, anything else → that path/URL."""
    if resume in (None, "", "null", "none", False):
        return None
    if str(resume) != "auto":
        return str(resume)
    fs, path = _fs(ckpt_dir, storage_options)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    found = [n for n in names if n == "last.ckpt" or re.fullmatch(r"hpc_ckpt_\d+\.ckpt", n)]
    if not found:
        return None

    def mtime(name: str) -> float:
        info = fs.info(_join(path, name))
        t = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        return t.timestamp() if hasattr(t, "timestamp") else float(t)

    return _join(ckpt_dir, max(found, key=mtime))


def _read_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    fs, path = _fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def stable_run_id(ckpt_path: str | None, ckpt_dir: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The W&B run id: the resumed checkpoint's (sidecar ``wandb_run_id.txt`` next to it, else the checkpoint
    itself), else ``slurm-<SLURM_JOB_ID>`` (array jobs: ``slurm-<array job>_<task>``), else a new id."""
    if ckpt_path:
        fs, path = _fs(ckpt_dir, storage_options)
        side = _join(path, RUN_ID_FILE)
        try:
            if fs.exists(side):
                rid = fs.cat_file(side).decode().strip()
                if rid:
                    return rid
        except (FileNotFoundError, OSError):
            pass
        info = _read_checkpoint(ckpt_path, storage_options).get("m3leo") or {}
        if info.get("wandb_run_id"):
            return str(info["wandb_run_id"])
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    import uuid

    return uuid.uuid4().hex[:12]


def _wandb_mode(value: str, where: str) -> WandbMode:
    if value not in get_args(WandbMode):
        raise ConfigError(f"{where}: W&B mode {value!r} is not one of {', '.join(get_args(WandbMode))}")
    return cast(WandbMode, value)


def wandb_mode(configured: str | None) -> WandbMode:
    """``WANDB_MODE`` if set; else the configured mode; else online when an API key is configured, else offline."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return _wandb_mode(env, "WANDB_MODE")
    if configured:
        return _wandb_mode(str(configured), "config key logger.wandb.mode")
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def manifest_summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What to log about the dataset: version, source, counts per region and split, modalities, shard count."""
    return {
        "format_version": manifest.get("format_version"),
        "created": manifest.get("created"),
        "source": manifest.get("source"),
        "regions": manifest.get("regions"),
        "splits": manifest.get("splits"),
        "num_samples": manifest.get("num_samples"),
        "num_shards": len(manifest.get("shards") or []),
        "bytes": sum(int(s.get("bytes") or 0) for s in manifest.get("shards") or []),
        "compression": manifest.get("compression"),
        "modalities": sorted((manifest.get("modalities") or {}).keys()),
    }


# --- building blocks -----------------------------------------------------------------------------------------------

def build_datamodule(cfg: DictConfig) -> M3LEODataModule:
    """The M3LEODataModule of ``cfg.data`` (its arguments, checked by the schema) with ``cfg.transforms`` as
    device-transform config."""
    return M3LEODataModule(**plain(cfg.data), transforms=plain(cfg.transforms))


def describe_data(cfg: DictConfig, dm: M3LEODataModule) -> tuple[DataInfo, Any]:
    """Channels per input, classes / bands per target, regions — from a transforms instance built here (the
    DataModule builds its own per rank once the trainer is attached)."""
    from m3leo_stream.transforms import build_device_transforms

    dm.setup("fit")
    t = build_device_transforms(plain(cfg.transforms), dm.modalities, dm.shard_root.stats, inputs=dm.inputs,
                                targets=dm.targets, train=False, seed=int(cfg.seed), rank=0)
    info: dict[str, Any] = {"in_channels": {m: len(t.channels[m]) for m in dm.inputs},
                            "channel_names": {m: list(t.channels[m]) for m in dm.inputs},
                            "region_names": list(dm.region_names), "ignore_index": int(t.ignore_index),
                            "input_px": max(t.out_px[m] for m in dm.inputs)}
    if dm.targets:
        target = dm.targets[0]
        if len(dm.targets) > 1:
            log.warning("several targets %s: the task uses the first, %s", dm.targets, target)
        info["target"] = target
        info["target_px"] = t.out_px[target]
        mod = dm.modalities[target]
        if target in t.num_classes:
            info["num_classes"] = t.num_classes[target]
            info["class_names"] = list(t.class_names[target])
        else:
            plan = getattr(t, "targets", {}).get(target)
            bands = list(getattr(plan, "bands", range(len(mod.bands))))
            stats = dm.shard_root.stats
            mean, std = [], []
            for i in bands:
                s = float(mod.scale[i])
                mean.append(stats.value(target, mod.bands[i], "mean") * s)
                std.append((stats.value(target, mod.bands[i], "std") or 1.0) * s)  # std 0: a constant band
            info.update(out_channels=len(bands), target_bands=[mod.bands[i] for i in bands], target_mean=mean,
                        target_std=std)
    return DataInfo(**info), t


def build_task(cfg: DictConfig, info: DataInfo) -> BaseTask:
    """The task of ``cfg.task`` (its ``_target_`` and arguments) on ``cfg.model`` and the data ``info``."""
    make = hydra.utils.instantiate(cfg.task, _partial_=True, _convert_="all", _recursive_=False)
    return make(model=plain(cfg.model), data_info=info, seed=int(cfg.seed))


def build_callbacks(cfg: DictConfig) -> tuple[list[pl.Callback], Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from m3leo_stream.callbacks import (
        BestCheckpoint,
        ImagePanels,
        KeyRecorder,
        LastCheckpoint,
        LoaderMetricsLog,
        Periodic,
        ProgressLog,
        RunLengthIntervals,
        TrainingSpeed,
    )

    ck = cfg.checkpoint
    every = int(cfg.callbacks.log_every_n_steps)
    last = LastCheckpoint(_join(str(ck.dir), "last.ckpt"), int(ck.every_n_train_steps or 0))
    cbs: list[pl.Callback] = [last]
    best = None
    if ck.monitor:
        if ck.mode not in ("min", "max"):
            raise ValueError(f"checkpoint.mode must be min or max, got {ck.mode!r}")
        safe = str(ck.monitor).replace("/", "_")
        best = BestCheckpoint(last, dirpath=ck.dir, filename=f"best-{{step:08d}}-{safe}={{{ck.monitor}:.4f}}",
                              monitor=str(ck.monitor), mode=str(ck.mode), save_top_k=int(ck.save_top_k),
                              save_last=False, auto_insert_metric_name=False)
        cbs.append(best)
    if cfg.trainer.get("enable_progress_bar", True):
        from lightning.pytorch.callbacks import TQDMProgressBar

        cbs.append(TQDMProgressBar(refresh_rate=every))  # its metrics are read on the host: not every step
    else:
        cbs.append(ProgressLog(int(cfg.callbacks.progress_every_n_steps)))
    speed, loader = TrainingSpeed(every), LoaderMetricsLog(every)
    panels = ImagePanels(int(cfg.callbacks.panels_every_n_steps), int(cfg.callbacks.panels_max_images))
    cbs += [speed, loader, LearningRateMonitor(logging_interval="step"), panels]
    fitted: list[tuple[Periodic, int]] = [(speed, 20), (loader, 20), (panels, 2)]
    fitted += [(cb, 10) for cb in cbs if isinstance(cb, ProgressLog)]
    cbs.append(RunLengthIntervals(fitted, curve_points=20))
    if cfg.get("record_keys_dir"):
        cbs.append(KeyRecorder(str(cfg.record_keys_dir)))
    return cbs, best


def build_logger(cfg: DictConfig, run_id: str, dm) -> Any:
    w = cfg.logger.get("wandb") if cfg.get("logger") else None
    mode = wandb_mode(w.get("mode")) if w is not None else "disabled"
    if w is None or mode == "disabled":  # still keep metrics: a CSV log in the run directory
        from lightning.pytorch.loggers import CSVLogger

        local = str(cfg.run_dir) if _is_local(str(cfg.run_dir)) else "csv-logs"
        return CSVLogger(save_dir=local, name="csv", version=run_id)
    from lightning.pytorch.loggers import WandbLogger

    save_dir = w.get("save_dir") or (str(cfg.run_dir) if _is_local(str(cfg.run_dir)) else "wandb-runs")
    os.makedirs(save_dir, exist_ok=True)
    logger = WandbLogger(project=w.project, entity=w.get("entity"), name=w.get("name") or cfg.experiment_name,
                         id=run_id, resume="allow", mode=mode, save_dir=save_dir, tags=list(w.get("tags") or []),
                         log_model=bool(w.get("log_model", False)))
    logger._wandb_init.pop("anonymous", None)  # Lightning passes None, which wandb >= 0.19 warns about
    return logger


def _slurm_plugins() -> list[Any]:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # ranks and rendezvous from Slurm; the requeue on SIGUSR1 is RequeueOnSignal's (at a step boundary), not
        # Lightning's (which saves inside the signal handler, mid-step: the batch in flight would be skipped)
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def resolve_precision(precision: Any, accelerator: Any) -> Any:
    """``auto`` → ``bf16-mixed`` where training runs on CUDA GPUs that support bf16, else ``32-true``."""
    if str(precision) != "auto":
        return precision
    gpu = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def _world(tcfg: Mapping[str, Any]) -> int:
    devices = tcfg.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif str(devices) in ("auto", "-1"):
        gpu = str(tcfg.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        per_node = torch.cuda.device_count() if gpu else 1
    else:
        per_node = int(devices)
    return per_node * int(tcfg.get("num_nodes") or 1)


def build_strategy(tcfg: Mapping[str, Any], ddp: Mapping[str, Any]) -> Any:
    """``trainer.strategy``, with ``ddp`` (and ``auto`` on more than one device) built as a ``DDPStrategy`` with the
    options of the ``ddp`` config section."""
    strategy = tcfg.get("strategy", "auto")
    if not (strategy == "ddp" or (strategy == "auto" and _world(tcfg) > 1)):
        return strategy
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    opts: dict[str, Any] = dict(ddp)
    timeout = opts.pop("timeout_s", None)
    if timeout:
        opts["timeout"] = timedelta(seconds=float(timeout))
    return DDPStrategy(**opts)


def _write_text(url: str, text: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = _fs(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    try:
        fs.makedirs(parent, exist_ok=True)
    except (OSError, NotImplementedError):
        pass
    with fs.open(path, "wb") as f:
        f.write(text.encode())


# --- the run ---------------------------------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) the configured experiment; returns where things are (also printed)."""
    validate(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.verbose:
        logging.getLogger("m3leo_stream").setLevel(logging.DEBUG)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision(str(cfg.matmul_precision))  # "high": TF32 matmuls on GPUs that have it
    so = plain(cfg.data.get("storage_options")) or None
    ckpt_dir = str(cfg.checkpoint.dir)
    ckpt_path = resolve_resume(cfg.get("resume"), ckpt_dir, so)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)

    dm = build_datamodule(cfg)
    info, transforms = describe_data(cfg, dm)
    task = build_task(cfg, info)
    task.denormalize = transforms.denormalize

    run_id = stable_run_id(ckpt_path, ckpt_dir, so)
    task.run_info["wandb_run_id"] = run_id
    logger = build_logger(cfg, run_id, dm)
    callbacks, best_cb = build_callbacks(cfg)
    requeue_cb = RequeueOnSignal(_join(ckpt_dir, "last.ckpt"), signal.SIGUSR1, storage_options=so)
    callbacks.append(requeue_cb)

    tcfg = plain(cfg.trainer)
    tcfg["use_distributed_sampler"] = False  # the loaders plan per rank (contracts §2)
    tcfg["precision"] = resolve_precision(tcfg.get("precision"), tcfg.get("accelerator"))
    tcfg["strategy"] = build_strategy(tcfg, plain(cfg.ddp))
    trainer = pl.Trainer(**tcfg, logger=logger, callbacks=callbacks, plugins=_slurm_plugins(),
                         default_root_dir=ckpt_dir)  # Lightning's own requeue (hpc_ckpt_N.ckpt) is off: RequeueOnSignal

    resolved = scrub(OmegaConf.to_container(cfg, resolve=True))
    if trainer.is_global_zero:
        _write_text(_join(ckpt_dir, RUN_ID_FILE), run_id + "\n", so)
        _write_text(_join(str(cfg.run_dir), "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(resolved)), so)
    if logger:
        logger.log_hyperparams({**resolved, "dataset": manifest_summary(dm.shard_root.manifest),
                                "data_info": scrub(dataclasses.asdict(info))})

    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    from m3leo_stream.callbacks import LastCheckpoint

    last_cb = next(c for c in callbacks if isinstance(c, LastCheckpoint))
    trained = ckpt_path is None or last_cb.started_at_step is not None
    if requeue_cb.requested:  # stopped by the signal: last.ckpt gets that step and the requeued job goes on from it
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            import wandb

            wandb.finish()  # flush this part of the run now: the requeue terminates the job's processes
        requeue_cb.requeue(trainer)
        return {"checkpoint": requeue_cb.path, "run_id": run_id, "global_step": int(trainer.global_step),
                "requeued": True}
    final = _join(ckpt_dir, "last.ckpt")

    results: dict[str, Any] = {"checkpoint": final, "best_checkpoint": best_cb.best_model_path if best_cb else None,
                               "run_id": run_id, "global_step": int(trainer.global_step), "trained": trained}
    if cfg.get("save_encoder") and hasattr(task, "encoder"):
        url = _join(str(cfg.run_dir), "encoder.pt")
        if trainer.is_global_zero:
            from m3leo_stream.encoder_card import export_encoder  # + encoder.safetensors, encoder.card.json
            from m3leo_stream.models import MultiModalEncoder

            encoder: MultiModalEncoder = getattr(task, "encoder")  # a pretraining task's
            export_encoder(encoder, url, transforms, dm.shard_root.stats,
                           {"channel_names": info.channel_names, "run_id": run_id})
        results["encoder"] = url
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test_after_fit"):
        trainer.test(task, datamodule=dm)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    results["metrics"] = metrics
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and trainer.is_global_zero:
        exp = logger.experiment
        results["wandb_dir"] = getattr(exp, "dir", None) and str(Path(exp.dir).parent)
        results["wandb_mode"] = wandb_mode(cfg.logger.wandb.get("mode"))
        results["wandb_url"] = getattr(exp, "url", None) if results["wandb_mode"] == "online" else None
        import wandb

        wandb.finish()
    if trainer.is_global_zero:
        if not trained:
            print(f"[m3leo] nothing to train: {ckpt_path} is at step {trainer.global_step}, trainer.max_steps is "
                  f"{trainer.max_steps}. To train on, raise trainer.max_steps; to train afresh, rm -r {cfg.run_dir} "
                  f"(or resume=null). Results of that run:")
        print(f"[m3leo] checkpoint: {final}")
        if results["best_checkpoint"]:
            print(f"[m3leo] best checkpoint ({cfg.checkpoint.monitor}, {cfg.checkpoint.mode}): "
                  f"{results['best_checkpoint']}")
        if results.get("encoder"):
            print(f"[m3leo] encoder: {results['encoder']}")
        if results.get("wandb_mode"):
            where = results.get("wandb_url") or results.get("wandb_dir")
            print(f"[m3leo] W&B run {run_id} ({results['wandb_mode']}): {where}")
            if results["wandb_mode"] == "offline":
                print(f"[m3leo]   upload later with: wandb sync {results.get('wandb_dir')}")
        else:
            print(f"[m3leo] W&B disabled; metrics: {getattr(logger, 'log_dir', None)}")
        print(json.dumps({"m3leo_result": {k: v for k, v in results.items() if k != "metrics"}}))
    return results


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
"""What a user's input makes the run raise (bad keys or values, a root or checkpoint that is not there, modalities
the root lacks, a plan that cannot be resumed): one line, not a traceback, unless ``HYDRA_FULL_ERROR=1``."""


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    verbose = bool(cfg.get("verbose")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    if not verbose:
        from m3leo_stream._warnings import quiet_dependencies

        quiet_dependencies()
    try:
        run(cfg)
    except USER_ERRORS as e:
        if verbose:
            raise
        hint = "" if isinstance(e, ConfigError) else "  (-v shows the traceback)"
        raise SystemExit(f"error: {e}{hint}") from None


VERBOSE_FLAGS = ("-v", "--verbose")


def cli(argv: list[str] | None = None) -> None:
    """``python -m m3leo_stream.train``: :func:`main` with ``-v``/``--verbose`` accepted anywhere among the
    overrides, as ``verbose=true`` plus ``HYDRA_FULL_ERROR=1`` (full tracebacks of composition errors too)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in VERBOSE_FLAGS for a in args):
        os.environ["HYDRA_FULL_ERROR"] = "1"
        args = [a for a in args if a not in VERBOSE_FLAGS] + ["verbose=true"]
    sys.argv = [sys.argv[0], *args]
    main()


if __name__ == "__main__":
    cli()
