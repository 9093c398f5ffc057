"""``sbatch slurm/pretrain.sh`` (and ``finetune.sh``) on a real Slurm cluster, on CPU (gloo DDP, tiny shards):
2 tasks on 1 node and 1 task on each of 2 emulated nodes train on disjoint samples and leave a checkpoint; a USR1
mid-epoch (to the tasks, or to the batch shell only as ``--signal=B:USR1@N`` sends it) checkpoints, requeues and
resumes, and the keys trained across both runs equal an uninterrupted run's, none twice."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import slurm_support as ss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "m3leo_stream"))
from wandb_reader import offline_runs, read_run  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 40
BATCH = 1  # per rank: steps per epoch = planned train chips // (2 ranks x 1)
# 1 CPU per task; no GPUs in the test cluster (the script's default asks for one per task)
CPU_JOB = ["--gpus-per-task=0", "--cpus-per-task=1", "--mem=2G", "--time=10:00"]


def _overrides(root: Path, run: Path) -> list[str]:
    return [
        "experiment=demo", f"data.root={root}", "trainer.accelerator=cpu", "trainer.strategy=ddp",
        f"trainer.max_steps={MAX_STEPS}", "trainer.max_epochs=-1", f"data.batch_size={BATCH}", "data.num_workers=1",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=2", "save_encoder=false", f"run_dir={run}",
        f"record_keys_dir={run / 'keys'}",
    ]


def _submit(tmp: Path, root: Path, nodes: int, per_node: int, name: str) -> tuple[str, Path, Path]:
    run = tmp / name
    (tmp / "logs").mkdir(exist_ok=True)
    job = ss.sbatch([f"--nodes={nodes}", f"--ntasks-per-node={per_node}", *CPU_JOB, f"--job-name=m3leo-{name}",
                     str(ss.REPO / "slurm" / "pretrain.sh"), *_overrides(root, run)], cwd=tmp)
    return job, run, tmp / "logs" / f"m3leo-{name}-{job}.out"


def _keys(run: Path) -> dict[int, list[tuple[int, int, str]]]:
    """rank -> [(epoch, global_step, key)] in the order trained."""
    out = {}
    for f in sorted((run / "keys").glob("rank*.tsv")):
        text = f.read_text()
        lines = text.splitlines()[: text.count("\n")]  # complete lines only (the file is being written)
        out[int(f.stem[4:])] = [(int(e), int(s), k) for e, s, k in (line.split("\t") for line in lines)]
    return out


DEMO_INPUTS = ("s1grd", "s2rgbm", "gssic")  # experiment=demo: a sample lacking one of them is not planned


def _train_keys(root: Path) -> set[str]:
    """Train samples the demo plans: its inputs are optional (m3leo_stream/configs/data), so those with at least one
    of them."""
    cols = ["key", "split", *(f"{m}_offset" for m in DEMO_INPUTS)]
    t = pq.read_table(root / "index.parquet", columns=cols).to_pylist()
    return {r["key"] for r in t if r["split"] == "train" and any(r[f"{m}_offset"] is not None for m in DEMO_INPUTS)}


def _check_disjoint_epochs(keys: dict[int, list], train: set[str], log: Path) -> None:
    assert sorted(keys) == [0, 1], f"expected rank0.tsv and rank1.tsv, got ranks {sorted(keys)}; see {log}"
    per_epoch: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rank, rows in keys.items():
        assert len(rows) == MAX_STEPS * BATCH, f"rank {rank} trained {len(rows)} samples, not {MAX_STEPS * BATCH}"
        for epoch, _, key in rows:
            per_epoch[epoch][rank].append(key)
    full = [e for e in per_epoch if e < max(per_epoch)]  # the last epoch may be cut by max_steps
    assert len(full) >= 2
    for e in full:
        a, b = per_epoch[e][0], per_epoch[e][1]
        assert not set(a) & set(b), f"epoch {e}: ranks trained the same samples {set(a) & set(b)}"
        assert len(a) == len(set(a)) and len(b) == len(set(b)), f"epoch {e}: a sample twice on one rank"
        seen = set(a) | set(b)
        whole = len(train) // (2 * BATCH) * (2 * BATCH)  # the last, partial global batch is dropped
        assert seen <= train and len(seen) == whole, f"epoch {e}: trained {sorted(seen)}, train split {sorted(train)}"


def _checkpoint_step(run: Path) -> int:
    import torch

    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists(), f"no checkpoint at {ckpt}"
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, tiny_shards):
    """The reference: 2 tasks on 1 node, no signal."""
    tmp = tmp_path_factory.mktemp("slurm-train")
    job, run, log = _submit(tmp, tiny_shards, 1, 2, "plain")
    ss.assert_completed(ss.wait_job(job, timeout=240, logs=[log]), job, [log])
    return job, run, log


def test_one_node_two_tasks(uninterrupted, tiny_shards):
    job, run, log = uninterrupted
    _check_disjoint_epochs(_keys(run), _train_keys(tiny_shards), log)
    assert _checkpoint_step(run) == MAX_STEPS


def test_two_nodes_one_task_each(slurm, tmp_path, tiny_shards):
    ss.require_slurm(nodes=2)
    job, run, log = _submit(tmp_path, tiny_shards, 2, 1, "twonode")
    records = ss.wait_job(job, timeout=240, logs=[log])
    ss.assert_completed(records, job, [log])
    hosts = ss.expand_nodelist(records[0]["NodeList"])
    assert len(hosts) == 2, f"ran on {hosts}"
    _check_disjoint_epochs(_keys(run), _train_keys(tiny_shards), log)
    assert _checkpoint_step(run) == MAX_STEPS


@pytest.mark.parametrize("to", ["tasks", "batch-shell"])
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path, tiny_shards, uninterrupted, to):
    """``scancel --signal=USR1`` reaches the tasks; ``scancel --batch --signal=USR1`` only the batch shell, as
    ``sbatch --signal=B:USR1@N`` does, and the script relays it to srun."""
    job, run, log = _submit(tmp_path, tiny_shards, 1, 2, f"requeue-{to}")
    steps_per_epoch = len(_train_keys(tiny_shards)) // (2 * BATCH)
    # signal once rank 0 is in the second step of an epoch after the first one: the stop lands mid-epoch
    deadline = time.monotonic() + 180
    while True:
        rows = _keys(run).get(0, []) if (run / "keys").exists() else []
        if rows and rows[-1][1] >= steps_per_epoch and rows[-1][1] % steps_per_epoch == 1:
            break
        assert ss.in_queue(job), f"job ended before it could be signalled; {ss.describe(job, [log])}"
        assert time.monotonic() < deadline, f"no training progress; {ss.describe(job, [log])}"
        time.sleep(0.05)
    cmd = ["scancel", "--signal=USR1", job] if to == "tasks" else ["scancel", "--batch", "--signal=USR1", job]
    subprocess.run(cmd, check=True, timeout=30)
    records = ss.wait_job(job, timeout=300, logs=[log])
    ss.assert_completed(records, job, [log])
    assert records[0]["Restarts"] == "1", f"expected one requeue; {ss.describe(job, [log])}"

    text = log.read_text(errors="replace")
    if to == "batch-shell":
        assert "batch shell got SIGUSR1" in text
    m = re.search(r"saving a checkpoint at step (\d+)", text)
    assert m, f"no signal checkpoint in the log; {ss.describe(job, [log])}"
    stopped = int(m.group(1))
    # mid-epoch, or at an epoch's last step when the signal reached the tasks in it (relayed signals can)
    assert 0 < stopped < MAX_STEPS, f"stopped at step {stopped}"
    assert "restart 1" in text

    # every sample of the uninterrupted run, in the same order, at the same step; none twice, none skipped
    assert _keys(run) == _keys(uninterrupted[1])
    assert _checkpoint_step(run) == MAX_STEPS
    # one W&B run: the requeued job logs under the same run id, its history going on from where the first stopped
    runs = offline_runs(str(run))
    assert len(runs) == 2, f"W&B offline runs: {runs}"
    first, second = (read_run(r) for r in runs)
    assert first["run_id"] == second["run_id"] and job in first["run_id"], (first["run_id"], second["run_id"])
    steps = [[row["trainer/global_step"] for row in r["history"] if "trainer/global_step" in row]
             for r in (first, second)]
    assert steps[0] and steps[1] and max(steps[0]) <= stopped <= min(steps[1]), (stopped, steps)


def test_finetune_from_environment_variables(slurm, tmp_path, tiny_shards):
    """finetune.sh with experiment, data root and run directory from M3LEO_* variables: a segmentation experiment
    (validation, best checkpoint, test after fit) on 2 emulated nodes x 1 task."""
    ss.require_slurm(nodes=2)
    run = tmp_path / "ft"
    (tmp_path / "logs").mkdir()
    env = ss.job_env(M3LEO_EXPERIMENT="seg_esawc_unet", M3LEO_DATA_ROOT=str(tiny_shards), M3LEO_RUN_DIR=str(run))
    job = ss.sbatch(["--nodes=2", "--ntasks-per-node=1", *CPU_JOB, str(ss.REPO / "slurm" / "finetune.sh"),
                     "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.max_steps=4", "data.batch_size=1",
                     "data.num_workers=1", "transforms.grid.size=64", "model.width=8", "model.depth=2",
                     "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                     "trainer.check_val_every_n_epoch=1"],
                    cwd=tmp_path, env=env)
    log = tmp_path / "logs" / f"m3leo-finetune-{job}.out"
    ss.assert_completed(ss.wait_job(job, timeout=240, logs=[log]), job, [log])
    text = log.read_text(errors="replace")
    assert "experiment=seg_esawc_unet" in text and f"data.root={tiny_shards}" in text
    assert "test/miou" in text  # test_after_fit of the fine-tuning experiment ran
    assert _checkpoint_step(run) == 4
    assert list((run / "checkpoints").glob("best-*val_miou=*.ckpt"))
