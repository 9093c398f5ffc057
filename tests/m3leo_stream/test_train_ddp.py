"""Every shipped experiment trains under ``trainer.strategy=ddp`` on two real gloo processes (the way torchrun
and srun start them): no rank stops on a parameter without a gradient, the ranks end with identical parameters, and
pretraining survives a modality dropped for every sample of the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from m3leo_stream.train import CONFIG_DIR, build_datamodule, describe_data

sys.path.insert(0, str(Path(__file__).parent))
from test_train import COMMON, SMALL_INPUTS, TINY_MAE, TINY_UNET  # noqa: E402

WORKER = Path(__file__).with_name("ddp_train_worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(overrides: list[str], out: Path, timeout: int = 300) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for r in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": str(r),
               "NODE_RANK": "0", "WORLD_SIZE": "2", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
        for k in [k for k in env if k.startswith("SLURM_")]:
            del env[k]
        log = open(out / f"log{r}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(out), *overrides], cwd=REPO, env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        try:
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
    for r, (p, _) in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n" + (out / f"log{r}.txt").read_text()[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def overrides_for(name: str, root: Path, run_dir: Path) -> list[str]:
    tiny = TINY_MAE if name in ("pretrain_mae", "demo") else TINY_UNET if "unet" in name else []
    return [f"experiment={name}", f"data.root={root}", f"run_dir={run_dir}", *COMMON, *tiny,
            *([] if name == "demo" else SMALL_INPUTS), "trainer.devices=2", "trainer.strategy=ddp",
            f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null", "data.batch_size=2"]


def check_ranks(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["world_size"] == b["world_size"] == 2 and a["strategy"] == "DDPStrategy"
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["no_grad"] == [] and b["no_grad"] == []
    differ = [n for n in a["params"] if a["params"][n] != b["params"][n]]
    assert not differ, f"parameters differ across ranks: {differ[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    # s2rgbm dropped for every sample of every batch: its head and patch embedding still get (zero) gradients
    ("pretrain_mae", ["trainer.precision=32-true", "+transforms.train.modality_dropout.p={s2rgbm: 1.0}"]),
    ("demo", []),
    ("seg_esawc_unet", []),
    ("reg_biomass_unet", []),
    ("reg_ghsbuilts_unet", []),
])
def test_experiment_trains_under_ddp(name, extra, small_shards, tmp_path):
    ranks = run_ddp(overrides_for(name, small_shards, tmp_path / "run") + extra, tmp_path / "out")
    check_ranks(ranks)


@pytest.mark.slow
def test_finetune_from_mae_trains_under_ddp(small_shards, tmp_path):
    """The segmentation head on a pretrained encoder (the default of slurm/finetune.sh) under DDP."""
    from m3leo_stream.models import MultiModalEncoder, save_encoder

    over = overrides_for("finetune_esawc_from_mae", small_shards, tmp_path / "run")
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", over)
    info, _ = describe_data(cfg, build_datamodule(cfg))
    enc = MultiModalEncoder(info.in_channels, size="custom", dim=32, depth=1, heads=2, patch_size=8)
    save_encoder(enc, str(tmp_path / "encoder.pt"))
    check_ranks(run_ddp([*over, f"model.encoder={tmp_path / 'encoder.pt'}"], tmp_path / "out"))


@pytest.mark.slow
def test_pretraining_with_a_modality_absent_from_every_rank_batch_trains_under_ddp(mixed_shards, tmp_path):
    """europe has no GUNW: with gunw optional, every batch of both ranks lacks it, yet its patch embedding and head
    get (zero) gradients, no NaN reaches the parameters and the ranks stay identical."""
    over = overrides_for("pretrain_mae", mixed_shards, tmp_path / "run") + [
        "trainer.precision=32-true", "data.inputs=[s2rgbm,gssic,gunw]", "data.regions=[europe]"]
    ranks = run_ddp(over, tmp_path / "out")
    check_ranks(ranks)
    assert ranks[0]["nonfinite"] == [] and ranks[1]["nonfinite"] == []
