"""A new user's training run: configs from an installed wheel (and the user's own config directory), -v, the best
checkpoint after a resume, a rerun at max_steps, and stderr without the dependencies' known-harmless warnings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from m3leo_stream.configs import CONFIG_DIR
from m3leo_stream.train import run

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.size=custom", "model.dim=32", "model.depth=1", "model.heads=2", "model.patch_size=8",
        "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.enable_progress_bar=false", "data.batch_size=4", "data.num_workers=0",
        "transforms.grid.size=32", "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=null"]
# warnings a short run must not print on stderr
NOISE = ("set_vital", "LeafSpec", "is not empty", "weights_only", "srun", "smaller than the logging interval",
         "litlogger", "anonymous setting", "URL not available", "Warning")


def _train(root: Path, run_dir: Path, extra: list[str]) -> dict:
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=demo", f"data.root={root}", f"run_dir={run_dir}",
                                "logger.wandb.mode=disabled", *TINY, *extra])
    return run(cfg)


@pytest.mark.slow
def test_wheel_ships_the_configs_and_trains_outside_the_checkout(small_shards, tmp_path):
    """A wheel holds every config; installed (not editable) and run from elsewhere it trains experiment=demo and an
    experiment of the user's own config directory (``--config-dir``, ``hydra.searchpath``), quietly."""
    src = tmp_path / "src"  # a copy: a build in the checkout would leave build/ there (and pick up what is in it)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("m3leo_stream", "shard_tools"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("m3leo_stream-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("m3leo_stream/configs/")}
    want = {f"m3leo_stream/configs/{p.relative_to(REPO / 'm3leo_stream' / 'configs')}"
            for p in (REPO / "m3leo_stream" / "configs").rglob("*.yaml")}
    assert len(want) > 15 and want <= shipped, sorted(want - shipped)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    mine = tmp_path / "my-configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - demo\n\nexperiment_name: mine\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    where = subprocess.run([sys.executable, "-c", "import m3leo_stream.configs as c; print(c.CONFIG_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where

    train = [sys.executable, "-m", "m3leo_stream.train"]
    p = subprocess.run([*train, "--config-dir", str(tmp_path / "my-configs"), "experiment=mine",
                        f"data.root={small_shards}", "run_dir=run", *TINY, "trainer.max_steps=2",
                        "trainer.val_check_interval=2"], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith('{"m3leo_result"')][-1])["m3leo_result"]
    assert res["global_step"] == 2 and (elsewhere / res["checkpoint"]).is_file()
    assert Path(elsewhere / res["best_checkpoint"]).is_file()
    noisy = [ln for ln in p.stderr.splitlines() if any(n in ln for n in NOISE)]
    assert not noisy, noisy
    assert p.stdout.count("have std 0") <= 1  # constant bands: once per modality, not per transforms instance

    p = subprocess.run([*train, f"hydra.searchpath=[file://{tmp_path / 'my-configs'}]", "experiment=mine",
                        "data.root=x", "--cfg", "job"], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "experiment_name: mine" in p.stdout, p.stderr[-2000:]
    p = subprocess.run([*train, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "demo, finetune_esawc_from_mae" in p.stdout, p.stdout[-2000:]


@pytest.mark.parametrize("how", [["-v"], ["verbose=true"]])
def test_verbose_shows_the_traceback(tmp_path, how):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "m3leo_stream.train", "experiment=pretrain_mae", "data.root=/nonexistent/shards",
           f"run_dir={tmp_path / 'run'}", "trainer.accelerator=cpu"]
    quiet = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr and "(-v shows the traceback)" in quiet.stderr
    loud = subprocess.run([*cmd[:3], *how, *cmd[3:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "no such shard root" in loud.stderr, loud.stderr


@pytest.mark.slow
def test_best_checkpoint_exists_after_a_resume_and_a_rerun_says_it_trained_nothing(small_shards, tmp_path, capsys):
    """Validation at the last step makes a new best after last.ckpt was written: last.ckpt is written again, so
    the rerun (at max_steps: nothing to train, and it says so) and a longer resume name a best file that exists;
    the resumed run still trains exactly the samples of an uninterrupted one."""
    # monitor=step, mode=max: every validation is a new best (and removes the one before)
    extra = ["checkpoint.monitor=step", "checkpoint.mode=max", "checkpoint.every_n_train_steps=100",
             "trainer.val_check_interval=2"]
    full = _train(small_shards, tmp_path / "full", [*extra, "trainer.max_steps=6",
                                                     f"record_keys_dir={tmp_path / 'keys_full'}"])
    a = _train(small_shards, tmp_path / "run", [*extra, "trainer.max_steps=4",
                                                 f"record_keys_dir={tmp_path / 'keys_run'}"])
    assert a["trained"] and Path(a["best_checkpoint"]).name.startswith("best-00000004")
    capsys.readouterr()
    again = _train(small_shards, tmp_path / "run", [*extra, "trainer.max_steps=4"])
    out = capsys.readouterr().out
    assert not again["trained"] and "[m3leo] nothing to train" in out and "rm -r" in out
    assert again["best_checkpoint"] == a["best_checkpoint"] and Path(again["best_checkpoint"]).is_file()
    on = _train(small_shards, tmp_path / "run", [*extra, "trainer.max_steps=6",
                                                  f"record_keys_dir={tmp_path / 'keys_run'}"])
    assert on["trained"] and Path(on["best_checkpoint"]).is_file()
    assert Path(on["best_checkpoint"]).name.startswith("best-00000006")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("best-*")) == [
        Path(on["best_checkpoint"]).name]
    keys = lambda d: (d / "rank0.tsv").read_text().splitlines()  # noqa: E731
    assert keys(tmp_path / "keys_run") == keys(tmp_path / "keys_full") and full["global_step"] == 6


def test_a_restored_best_record_forgets_files_that_are_gone(tmp_path):
    """A run resumed from an older last.ckpt (after a crash) whose best files a later best replaced."""
    import torch

    from m3leo_stream.callbacks import BestCheckpoint, LastCheckpoint

    kept, gone = str(tmp_path / "best-3.ckpt"), str(tmp_path / "best-5.ckpt")
    Path(kept).write_bytes(b"x")
    cb = BestCheckpoint(LastCheckpoint(str(tmp_path / "last.ckpt")), dirpath=str(tmp_path), monitor="m", mode="max",
                        save_top_k=2)
    cb.load_state_dict({"dirpath": str(tmp_path), "best_model_score": torch.tensor(5.0), "best_model_path": gone,
                        "best_k_models": {gone: torch.tensor(5.0), kept: torch.tensor(3.0)},
                        "kth_best_model_path": kept, "kth_value": torch.tensor(3.0), "last_model_path": ""})
    assert cb.best_model_path == kept and float(cb.best_model_score) == 3.0 and list(cb.best_k_models) == [kept]
    Path(kept).unlink()
    cb.load_state_dict({"dirpath": str(tmp_path), "best_model_score": torch.tensor(3.0), "best_model_path": kept,
                        "best_k_models": {kept: torch.tensor(3.0)}, "kth_best_model_path": kept,
                        "kth_value": torch.tensor(3.0), "last_model_path": ""})
    assert cb.best_model_path == "" and cb.best_model_score is None and float(cb.kth_value) == float("-inf")


def test_known_dependency_warnings_are_silenced_and_no_others():
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    from m3leo_stream._warnings import quiet_dependencies

    srun = "The `srun` command is available on your system but is not used. HINT: ..."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependencies()
        for message, category, module in [
                (srun, PossibleUserWarning, "lightning.fabric.plugins.environments.slurm"),
                ("'set_vital' is deprecated, please do not call", UserWarning,
                 "torchdata.stateful_dataloader.stateful_dataloader"),
                ("The number of training batches (6) is smaller than the logging interval Trainer(log_every_n_steps"
                 "=10).", PossibleUserWarning, "lightning.pytorch.loops.fit_loop"),
                ("Experiment logs directory /r/csv/abc exists and is not empty. Previous log files in this directory "
                 "will be deleted when the new ones are saved!", UserWarning, "lightning.fabric.loggers.csv_logs"),
                (srun, PossibleUserWarning, "m3leo_stream.train"),  # the same text from elsewhere still shows
                ("'set_vital' is deprecated", DeprecationWarning, "torchdata.stateful_dataloader"),  # other category
        ]:
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
    assert [(str(w.message)[:20], w.category) for w in seen] == [
        (srun[:20], PossibleUserWarning), ("'set_vital' is depre", DeprecationWarning)]
