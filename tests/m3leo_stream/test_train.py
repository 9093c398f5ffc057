"""End to end: every shipped experiment trains a couple of steps on tiny generated shards (model sizes overridden
to tiny, structure kept), W&B offline files hold the expected keys and no secrets, resume continues exactly, the
Hydra command line works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from m3leo_stream.train import (
    CONFIG_DIR,
    build_strategy,
    resolve_precision,
    resolve_resume,
    run,
    scrub,
    stable_run_id,
    wandb_mode,
)

sys.path.insert(0, str(Path(__file__).parent))
from wandb_reader import offline_runs, read_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

TINY_MAE = ["model.size=custom", "model.dim=32", "model.depth=1", "model.heads=2", "model.patch_size=8",
            "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2"]
TINY_UNET = ["model.width=4", "model.depth=2"]
SMALL_INPUTS = ["+transforms.modalities.s1grd.bands=[summer_*]", "+transforms.modalities.s2rgbm.bands=[07_*]"]
COMMON = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
          "trainer.log_every_n_steps=1", "data.batch_size=4", "data.num_workers=0", "transforms.grid.size=32",
          "checkpoint.every_n_train_steps=1"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides)


def run_exp(name: str, root: Path, run_dir: Path, extra: list[str] = (), wandb: str = "disabled") -> dict:
    tiny = TINY_MAE if name in ("pretrain_mae", "demo") else TINY_UNET if "unet" in name else []
    inputs = [] if name == "demo" else SMALL_INPUTS
    over = [f"experiment={name}", f"data.root={root}", f"run_dir={run_dir}", f"logger.wandb.mode={wandb}",
            *COMMON, *tiny, *inputs, "trainer.max_steps=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
            *extra]
    return run(compose_cfg(over))


@pytest.fixture(scope="module")
def pretrained(small_shards, tmp_path_factory) -> dict:
    """A tiny pretrain_mae run whose encoder the finetune experiment loads (inputs as in the finetune run)."""
    run_dir = tmp_path_factory.mktemp("runs") / "pretrain"
    return run_exp("pretrain_mae", small_shards, run_dir,
                   ["trainer.precision=32-true", "data.inputs=[s1grd,s2rgbm]"])


@pytest.mark.slow
@pytest.mark.parametrize("name,keys", [
    ("pretrain_mae", ["val/loss", "val/loss/s1grd", "val/loss/s2rgbm", "val/loss/gssic"]),
    ("seg_esawc_unet", ["val/miou", "val/oa", "val/iou/tree_cover", "test/miou"]),
    ("reg_biomass_unet", ["val/rmse", "val/mae", "test/rmse"]),
    ("reg_ghsbuilts_unet", ["val/rmse", "val/mae", "test/rmse"]),
    ("demo", ["val/loss", "train/loss"]),
])
def test_experiment_runs(name, keys, small_shards, tmp_path):
    res = run_exp(name, small_shards, tmp_path / name)
    assert res["global_step"] == 2
    assert Path(res["checkpoint"]).is_file()
    for k in keys:
        assert k in res["metrics"], f"{name}: {k} missing from {sorted(res['metrics'])}"
    if name != "demo" and name != "pretrain_mae":
        regional = [k for k in res["metrics"] if k.startswith(("val/conus/", "val/europe/"))]
        assert regional, f"{name}: no per-region metrics in {sorted(res['metrics'])}"
    ck = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)
    assert ck["m3leo"]["wandb_run_id"] == res["run_id"]
    assert ck["global_step"] == 2
    mode = {"pretrain_mae": "min", "seg_esawc_unet": "max"}.get(name)
    if mode:
        cfg = compose_cfg([f"experiment={name}", "data.root=x"])
        assert cfg.checkpoint.mode == mode


@pytest.mark.slow
def test_finetune_from_mae(pretrained, small_shards, tmp_path):
    enc = pretrained["encoder"]
    assert Path(enc).is_file()
    res = run_exp("finetune_esawc_from_mae", small_shards, tmp_path / "ft", TINY_MAE[:0] + [f"model.encoder={enc}",
                  "model.decoder_channels=16"])
    assert "val/miou" in res["metrics"] and "test/miou" in res["metrics"]
    # the encoder weights were loaded: the finetuned checkpoint started from them (checked on a frozen copy)
    res2 = run_exp("finetune_esawc_from_mae", small_shards, tmp_path / "ft_frozen",
                   [f"model.encoder={enc}", "model.decoder_channels=16", "model.freeze_encoder=true"])
    ck = torch.load(res2["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    src = torch.load(enc, map_location="cpu", weights_only=False)["state_dict"]
    for k, v in src.items():
        assert torch.equal(ck[f"model.encoder.{k}"], v), k
    # also loadable straight from the pretraining checkpoint
    res3 = run_exp("finetune_esawc_from_mae", small_shards, tmp_path / "ft_ckpt",
                   [f"model.encoder={pretrained['checkpoint']}", "model.decoder_channels=16"])
    assert res3["global_step"] == 2


@pytest.mark.slow
def test_regression_target_stays_float(small_shards):
    from m3leo_stream.train import build_datamodule, describe_data

    cfg = compose_cfg(["experiment=reg_biomass_unet", f"data.root={small_shards}", "data.num_workers=0",
                       *SMALL_INPUTS, "transforms.grid.size=64"])
    dm = build_datamodule(cfg)
    info, t = describe_data(cfg, dm)
    assert info.out_channels == 1 and info.target_bands == ["agb"]
    batch = t(next(iter(dm.val_dataloader())), step=0)
    y = batch["biomass"]
    assert y.dtype == torch.float32 and y.shape[-1] == 45
    v = y[batch["biomass_valid"].expand_as(y)]
    assert (v != v.round()).any(), "biomass values look integer: truncated somewhere"


@pytest.mark.slow
def test_wandb_offline_files_have_metrics_and_no_secrets(small_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "secret-api-key-0123456789")
    run_dir = tmp_path / "wb"
    res = run_exp("demo", small_shards, run_dir, [
        "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.panels_every_n_steps=2",
        "+data.storage_options.key=AKIAEXAMPLEKEY", "+data.storage_options.secret=secret-s3-value",
    ], wandb="offline")
    assert res["wandb_mode"] == "offline"
    runs = offline_runs(str(run_dir))
    assert len(runs) == 1
    deadline = time.monotonic() + 60  # wandb-core may still be flushing the offline file after finish()
    while True:
        r = read_run(runs[0])
        if (r["run_id"] and any("val/loss" in row for row in r["history"])) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r["run_id"] == res["run_id"]
    keys = set().union(*map(set, r["history"]))
    expected = {"train/loss", "train/loss/s1grd", "train/loss/s2rgbm", "train/loss/gssic", "val/loss",
                "val/loss/s1grd", "perf/samples_per_s", "perf/samples_per_s_per_device", "perf/data_wait_frac",
                "perf/cpu_rss_peak_gb", "lr-AdamW", "loader/samples_per_s", "loader/wait_s"}
    assert expected <= keys, sorted(expected - keys)
    assert any(k.startswith("images/s2rgbm") for k in keys) and any(k.startswith("images/s1grd") for k in keys)
    assert r["config"]["dataset"]["num_samples"] == 20
    assert r["config"]["data"]["storage_options"]["secret"] == "***"
    for p in Path(run_dir).rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            for secret in (b"secret-api-key-0123456789", b"secret-s3-value", b"AKIAEXAMPLEKEY"):
                assert secret not in blob, f"{secret!r} written to {p}"


@pytest.mark.slow
def test_a_short_run_still_logs_its_training_curve_and_panels(small_shards, tmp_path, monkeypatch):
    """Default intervals (loss every 50 steps, panels every 500) on an 8-step run: cut to the run's length."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "short"
    run_exp("demo", small_shards, run_dir, ["trainer.max_steps=8", "trainer.val_check_interval=8",
                                            "trainer.log_every_n_steps=50", "callbacks.panels_every_n_steps=500"],
            wandb="offline")
    runs = offline_runs(str(run_dir))
    deadline = time.monotonic() + 60  # wandb-core may still be flushing the offline file after finish()
    while True:
        r = read_run(runs[0])
        if any("val/loss" in row for row in r["history"]) or time.monotonic() > deadline:
            break
        time.sleep(1)
    loss_steps = {row["trainer/global_step"] for row in r["history"] if "train/loss" in row}
    assert len(loss_steps) >= 4, sorted(loss_steps)
    panels = [row for row in r["history"] if any(k.startswith("images/") for k in row)]
    assert len(panels) >= 1


def _keys(d: Path) -> list[str]:
    return (d / "rank0.tsv").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("cut", [3, 4])  # 2 batches per epoch here: 3 = mid-epoch, 4 = at an epoch's last batch
def test_resume_continues_exactly(small_shards, tmp_path, cut):
    extra = ["data.num_workers=1", "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=100",
             "checkpoint.monitor=null", "checkpoint.every_n_train_steps=100"]
    full = run_exp("demo", small_shards, tmp_path / "full",
                   extra + ["trainer.max_steps=8", f"record_keys_dir={tmp_path / 'keys_full'}"])
    assert full["global_step"] == 8
    lines = _keys(tmp_path / "keys_full")
    by_epoch = {}
    for ln in lines:
        by_epoch.setdefault(ln.split("\t")[0], []).append(ln.split("\t")[2])
    assert len({tuple(v) for v in by_epoch.values()}) > 1, "every epoch has the same order: set_epoch not reaching"
    a = run_exp("demo", small_shards, tmp_path / "cut",
                extra + [f"trainer.max_steps={cut}", f"record_keys_dir={tmp_path / 'keys_cut'}"])
    b = run_exp("demo", small_shards, tmp_path / "cut",
                extra + ["trainer.max_steps=8", f"record_keys_dir={tmp_path / 'keys_cut'}", "resume=auto"])
    assert b["global_step"] == 8
    assert b["run_id"] == a["run_id"]  # the resumed job continues the same W&B run
    got, want = _keys(tmp_path / "keys_cut"), _keys(tmp_path / "keys_full")
    assert len(want) == 8 * 4
    assert got == want
    # resume=null starts over
    c = run_exp("demo", small_shards, tmp_path / "cut",
                extra + ["trainer.max_steps=1", "resume=null"])
    assert c["global_step"] == 1


class SignalAt(__import__("lightning").pytorch.Callback):
    """Sends this process SIGUSR1 in the middle of training batch ``at`` (counted over the run)."""

    def __init__(self, at: int):
        self.at, self.seen = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen == self.at:
            os.kill(os.getpid(), __import__("signal").SIGUSR1)
        self.seen += 1


@pytest.mark.slow
@pytest.mark.parametrize("at,stop", [(2, 3), (1, 2)])  # 2 batches per epoch: mid-epoch, an epoch's last batch
def test_requeue_signal_resumes_exactly(small_shards, tmp_path, monkeypatch, at, stop):
    """SIGUSR1 during a step checkpoints after it, even at an epoch's last batch, and the resumed run trains
    exactly the samples of an uninterrupted one, in the same epochs."""
    from m3leo_stream import train as train_mod

    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    extra = ["data.num_workers=1", "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1",
             "checkpoint.monitor=null", "checkpoint.every_n_train_steps=100", "trainer.limit_val_batches=1"]
    full = run_exp("demo", small_shards, tmp_path / "full",
                   extra + ["trainer.max_steps=6", f"record_keys_dir={tmp_path / 'keys_full'}"])
    build = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks", lambda cfg: (build(cfg)[0] + [SignalAt(at)], build(cfg)[1]))
    a = run_exp("demo", small_shards, tmp_path / "cut", extra + ["trainer.max_steps=6",
                                                                 f"record_keys_dir={tmp_path / 'keys_cut'}"])
    assert a.get("requeued") and a["global_step"] == stop
    monkeypatch.setattr(train_mod, "build_callbacks", build)
    b = run_exp("demo", small_shards, tmp_path / "cut",
                extra + ["trainer.max_steps=6", f"record_keys_dir={tmp_path / 'keys_cut'}", "resume=auto"])
    assert full["global_step"] == b["global_step"] == 6
    assert _keys(tmp_path / "keys_cut") == _keys(tmp_path / "keys_full")


def test_run_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"
    with pytest.raises(ValueError, match="config key logger.wandb.mode: W&B mode 'onlin' is not one of"):
        monkeypatch.delenv("WANDB_MODE")
        wandb_mode("onlin")
    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(ValueError, match="WANDB_MODE: W&B mode 'offlin'"):
        wandb_mode("online")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert stable_run_id(None, str(tmp_path)) == "slurm-4242"
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "wandb_run_id.txt").write_text("abc123\n")
    assert resolve_resume("auto", str(tmp_path)) == f"{tmp_path}/last.ckpt"
    assert stable_run_id(f"{tmp_path}/last.ckpt", str(tmp_path)) == "abc123"
    assert resolve_resume("auto", str(tmp_path / "none")) is None
    assert resolve_resume(None, str(tmp_path)) is None
    assert scrub({"a": {"api_key": "k", "Secret": "s", "x": [{"token": "t"}]}, "b": 1}) == {
        "a": {"api_key": "***", "Secret": "***", "x": [{"token": "***"}]}, "b": 1}


def test_all_experiments_compose_with_contract_keys():
    for f in sorted((REPO / "m3leo_stream" / "configs" / "experiment").glob("*.yaml")):
        cfg = compose_cfg([f"experiment={f.stem}", "data.root=/x"])
        assert cfg.experiment_name == f.stem
        for key in ("data.root", "data.batch_size", "data.num_workers", "data.regions", "data.region_weights",
                    "data.inputs", "data.targets", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                    "trainer.strategy", "trainer.max_steps", "trainer.max_epochs", "trainer.precision",
                    "trainer.limit_train_batches", "trainer.limit_val_batches", "run_dir", "checkpoint.dir",
                    "checkpoint.every_n_train_steps", "checkpoint.monitor", "checkpoint.mode", "resume",
                    "record_keys_dir", "logger.wandb.mode"):
            node = cfg
            for part in key.split("."):
                assert part in node, f"{f.stem}: no {key}"
                node = node[part]
        assert cfg.trainer.use_distributed_sampler is False
        assert cfg.checkpoint.dir == f"runs/{f.stem}/checkpoints"
        assert cfg.trainer.precision == "auto"  # every experiment: bf16-mixed on GPUs
    pre = compose_cfg(["experiment=pretrain_mae", "data.root=/x"])
    assert (pre.model.size, pre.model.patch_size, pre.model.mask_ratio) == ("base", 16, 0.75)
    assert list(pre.data.inputs) == ["s1grd", "s2rgbm", "gssic"]


def test_precision_and_ddp_strategy_from_config():
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_cfg(["experiment=pretrain_mae", "data.root=/x", "ddp.static_graph=true", "ddp.bucket_cap_mb=50"])
    want = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto", "auto") == want
    assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("16-mixed", "gpu") == "16-mixed"
    ddp = dict(cfg.ddp)
    s = build_strategy({"strategy": "ddp"}, ddp)
    assert isinstance(s, DDPStrategy)
    assert s._ddp_kwargs == {"find_unused_parameters": False, "static_graph": True, "gradient_as_bucket_view": True,
                             "bucket_cap_mb": 50}
    assert s._timeout.total_seconds() == 1800
    assert isinstance(build_strategy({"strategy": "auto", "devices": 2, "accelerator": "cpu"}, ddp), DDPStrategy)
    assert build_strategy({"strategy": "auto", "devices": 1, "accelerator": "cpu"}, ddp) == "auto"
    assert build_strategy({"strategy": "fsdp"}, ddp) == "fsdp"


@pytest.mark.slow
def test_command_line(small_shards, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    over = [f"data.root={small_shards}", f"run_dir={tmp_path / 'cli'}", *COMMON, *TINY_MAE, "trainer.max_steps=2",
            "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null"]
    p = subprocess.run([sys.executable, "-m", "m3leo_stream.train", "experiment=demo", *over], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[m3leo] checkpoint:" in p.stdout and "[m3leo] W&B run" in p.stdout
    line = [ln for ln in p.stdout.splitlines() if ln.startswith('{"m3leo_result"')][-1]
    res = json.loads(line)["m3leo_result"]
    assert Path(res["checkpoint"]).is_file() and res["wandb_mode"] == "offline"
    assert not list(tmp_path.glob("*.log")), "hydra wrote log files into the working directory"


@pytest.mark.parametrize("over,says", [
    (["data.root=/nonexistent/shards"], "error: /nonexistent/shards: no such shard root (it does not exist)"),
    (["data.inputs=[s1grd,nosuchmodality]"], "modalities ['nosuchmodality'] are not in this shard root"),
])
def test_a_user_mistake_is_one_line_without_a_traceback(small_shards, tmp_path, over, says):
    """A root that is not there, or a modality the root lacks: one line on stderr and a non-zero exit; the
    traceback only with HYDRA_FULL_ERROR=1."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "m3leo_stream.train", "experiment=pretrain_mae", f"data.root={small_shards}",
           f"run_dir={tmp_path / 'run'}", "trainer.accelerator=cpu", *over]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and says in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len([ln for ln in p.stderr.splitlines() if "error:" in ln]) == 1
    p = subprocess.run(cmd, cwd=tmp_path, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.slow
@pytest.mark.s3
def test_checkpoints_on_s3_and_resume(small_shards, tmp_path, s3):
    """checkpoint.dir on S3 (moto on loopback): last + best written there, resume=auto finds them, same run id."""
    import fsspec

    bucket = s3.new_bucket()
    ck = f"s3://{bucket}/runs/demo/checkpoints"
    extra = [f"checkpoint.dir={ck}", "checkpoint.every_n_train_steps=2"]
    a = run_exp("demo", small_shards, tmp_path / "r", extra)
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(ck, refresh=True))
    assert "last.ckpt" in names and "wandb_run_id.txt" in names and any(n.startswith("best-") for n in names)
    b = run_exp("demo", small_shards, tmp_path / "r", extra + ["trainer.max_steps=3"])
    assert b["global_step"] == 3 and b["run_id"] == a["run_id"]
    assert b["checkpoint"] == f"{ck}/last.ckpt"


def test_build_datamodule_passes_the_loader_keys():
    from m3leo_stream.train import build_datamodule

    dm = build_datamodule(compose_cfg(["experiment=demo", "data.root=/x"]))
    assert (dm.readahead_bytes, dm.copy_ahead, dm.transforms_ahead) == (4 * 2**30, None, False)
    dm = build_datamodule(compose_cfg(["experiment=demo", "data.root=/x", "data.readahead_bytes=123",
                                       "data.copy_ahead=false", "data.transforms_ahead=true"]))
    assert (dm.readahead_bytes, dm.copy_ahead, dm.transforms_ahead) == (123, False, True)
    dm = build_datamodule(compose_cfg(["experiment=demo", "data.root=/x", "data.readahead_bytes=null"]))
    assert dm.readahead_bytes is None


@pytest.mark.slow
def test_pretrain_with_an_optional_modality_uses_every_sample_of_every_region(mixed_shards, tmp_path, caplog):
    """europe has no GUNW and some conus chips lack it: optional (the default for inputs), one epoch consumes every
    training sample of both regions; required, only the samples carrying it, with the exclusions logged."""
    import pyarrow.parquet as pq

    t = pq.read_table(mixed_shards / "index.parquet", columns=["key", "split", "gunw_nbytes"]).to_pydict()
    train = {k for k, s in zip(t["key"], t["split"]) if s == "train"}
    with_gunw = {k for k, s, n in zip(t["key"], t["split"], t["gunw_nbytes"]) if s == "train" and n is not None}
    assert len(train) == 16 and with_gunw < train
    extra = ["trainer.precision=32-true", "data.inputs=[s2rgbm,gssic,gunw]", "trainer.val_check_interval=4"]
    res = run_exp("pretrain_mae", mixed_shards, tmp_path / "opt",
                  extra + ["trainer.max_steps=4", f"record_keys_dir={tmp_path / 'keys_opt'}"])
    keys = [line.split("\t")[2] for line in _keys(tmp_path / "keys_opt")]
    assert res["global_step"] == 4 and len(keys) == 16 and set(keys) == train
    assert "val/loss/gunw" in res["metrics"]
    with caplog.at_level("INFO"):
        res = run_exp("pretrain_mae", mixed_shards, tmp_path / "req",
                      extra + ["data.optional=[]", "trainer.max_steps=2", f"record_keys_dir={tmp_path / 'keys_req'}"])
    keys = [line.split("\t")[2] for line in _keys(tmp_path / "keys_req")]
    assert len(keys) == 8 and set(keys) <= with_gunw
    assert "excluded for missing members" in caplog.text and "gunw:" in caplog.text


@pytest.mark.slow
def test_training_substitutes_corrupt_members_and_never_consumes_them(small_shards, tmp_path):
    """Training over a root where two train samples' s1grd members have a flipped byte in every band, with
    ``data.on_unreadable=substitute``: the run completes, the two keys are never consumed, and the mismatches and
    substitutions reach the logged loader metrics."""
    import shutil

    import pyarrow.parquet as pq

    from m3leo_stream.modalities import REGISTRY

    root = tmp_path / "corrupt"
    shutil.copytree(small_shards, root)
    m = REGISTRY["s1grd"]
    plane = m.nbytes // len(m.bands)
    bad = [r for r in pq.read_table(root / "index.parquet").to_pylist() if r["split"] == "train"][:2]
    for r in bad:
        data = bytearray((root / r["shard"]).read_bytes())
        start = r["s1grd_offset"] + r["s1grd_nbytes"] - m.nbytes
        for b in range(len(m.bands)):
            data[start + b * plane + 1000] ^= 0x5A
        (root / r["shard"]).write_bytes(bytes(data))
    res = run_exp("pretrain_mae", root, tmp_path / "run",
                  ["trainer.precision=32-true", "data.on_unreadable=substitute", "trainer.max_steps=4",
                   "trainer.val_check_interval=4", f"record_keys_dir={tmp_path / 'keys'}"])
    keys = [line.split("\t")[2] for line in _keys(tmp_path / "keys")]
    assert res["global_step"] == 4 and len(keys) == 16
    assert not {r["key"] for r in bad} & set(keys)
    assert res["metrics"]["loader/checksum_failures"] >= 2 and res["metrics"]["loader/substitutions"] >= 2
