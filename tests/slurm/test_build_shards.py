"""``slurm/submit_build.sh``: a 2-task array build plus the dependent finalize job, on a real Slurm cluster,
produces the same shards (byte for byte), index and manifest entries as a single-process build."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import slurm_support as ss  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SHARD_SIZE = ss.TINY_SHARD_SIZE  # as the tiny_shards fixture: 12 shards, 6 per array task


def test_array_build_equals_single_build(slurm, tmp_path, tiny_src, tiny_shards):
    single = tiny_shards
    out = tmp_path / "array"
    res = subprocess.run(
        ["bash", str(ss.REPO / "slurm" / "submit_build.sh"), "--tasks=2", "--log-dir=logs", "--cpus-per-task=1",
         "--mem=1G", "--time=10:00", str(tiny_src), str(out), "--shard-size", SHARD_SIZE, "--quiet"],
        cwd=tmp_path, env=ss.job_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ids = dict(line.split("=", 1) for line in res.stdout.split())
    logs = [tmp_path / "logs" / "*.out"]
    array = ss.wait_job(ids["array"], timeout=180, logs=logs)
    ss.assert_completed(array, ids["array"], logs)
    assert sorted(r["ArrayTaskId"] for r in array) == ["0", "1"]
    fin = ss.wait_job(ids["finalize"], timeout=120, logs=logs)
    ss.assert_completed(fin, ids["finalize"], logs)

    # each task built its own half of the plan, and nothing else
    for task in ("0", "1"):
        log = next((tmp_path / "logs").glob(f"m3leo-build-{ids['array']}_{task}.out")).read_text()
        summary = json.loads(log[log.index("{"):])
        assert summary["task"] == f"{task}/2" and summary["shards_built"] == 6, log

    tars = sorted(p.relative_to(single) for p in single.rglob("*.tar"))
    assert len(tars) == 12
    assert tars == sorted(p.relative_to(out) for p in out.rglob("*.tar"))
    for rel in tars:
        assert filecmp.cmp(single / rel, out / rel, shallow=False), f"{rel} differs"
    assert pq.read_table(single / "index.parquet").equals(pq.read_table(out / "index.parquet"))
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (single, out))
    for k in ("shards", "splits", "num_samples", "members", "regions", "modalities", "source"):
        assert a[k] == b[k], k
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (single, out))
    assert sa.keys() == sb.keys()
    assert sa["s1grd"]["global"]["count"] == sb["s1grd"]["global"]["count"]
    assert sa["gssic"]["global"]["mean"] == pytest.approx(sb["gssic"]["global"]["mean"], rel=1e-12)


def _damage_one_member(root: Path) -> str:
    """Flip one byte inside a member of one shard (its size and tar structure unchanged); returns the shard path."""
    row = pq.read_table(root / "index.parquet", columns=["shard", "s1grd_offset", "s1grd_nbytes"]).to_pylist()[0]
    tar = root / row["shard"]
    data = bytearray(tar.read_bytes())
    data[row["s1grd_offset"] + row["s1grd_nbytes"] // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    return row["shard"]


def test_submit_build_verify_checks_the_finalized_root(slurm, tmp_path, tiny_src):
    """``submit_build.sh --verify=3``: after finalize, a 3-task verify array and its merge job run and find
    nothing; the same two scripts run again on a root with one damaged member: the tasks succeed, the merge job
    fails and names the shard."""
    out = tmp_path / "array"
    logs = [tmp_path / "logs" / "*.out"]
    res = subprocess.run(
        ["bash", str(ss.REPO / "slurm" / "submit_build.sh"), "--tasks=2", "--verify=3", "--log-dir=logs",
         "--cpus-per-task=1", "--mem=1G", "--time=10:00", str(tiny_src), str(out), "--shard-size", SHARD_SIZE,
         "--quiet"], cwd=tmp_path, env=ss.job_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ids = dict(line.split("=", 1) for line in res.stdout.split())
    assert set(ids) == {"plan", "array", "finalize", "verify", "verify_merge"}
    verify = ss.wait_job(ids["verify"], timeout=300, logs=logs)
    ss.assert_completed(verify, ids["verify"], logs)
    assert sorted(r["ArrayTaskId"] for r in verify) == ["0", "1", "2"]
    assert all(r["NumCPUs"] == "1" for r in verify), verify  # the array's --cpus-per-task
    merge = ss.wait_job(ids["verify_merge"], timeout=120, logs=logs)
    ss.assert_completed(merge, ids["verify_merge"], logs)
    log = next((tmp_path / "logs").glob(f"m3leo-verify-merge-{ids['verify_merge']}.out")).read_text()
    summary = json.loads(log[log.index("{"):])
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary == {"shards": len(manifest["shards"]), "samples": manifest["num_samples"], "problems": 0,
                       "tasks": 3}, log
    assert "PROBLEM" not in log
    assert sorted(p.name for p in (out / "_build" / "verify").iterdir()) == \
        [f"task-{i:05d}-of-00003.json" for i in range(3)]

    damaged = _damage_one_member(out)
    again = ss.sbatch(["--array=0-2", "--cpus-per-task=1", "--mem=1G", "--time=10:00", "--output=logs/%x-%A_%a.out",
                       str(ss.REPO / "slurm" / "check_shards.sh"), "verify", str(out)], cwd=tmp_path)
    merge_cmd = f"{sys.executable} -m shard_tools.cli verify {out} --merge --num-tasks 3"
    merge_again = ss.sbatch([f"--dependency=afterany:{again}", "--job-name=m3leo-verify-merge", "--mem=1G",
                             "--time=10:00", "--output=logs/%x-%j.out", f"--wrap={merge_cmd}"], cwd=tmp_path)
    ss.assert_completed(ss.wait_job(again, timeout=300, logs=logs), again, logs)
    failed = ss.wait_job(merge_again, timeout=120, logs=logs)
    assert [r["JobState"] for r in failed] == ["FAILED"] and failed[0]["ExitCode"] == "1:0", ss.describe(merge_again)
    log = next((tmp_path / "logs").glob(f"m3leo-verify-merge-{merge_again}.out")).read_text()
    problems = [ln for ln in log.splitlines() if ln.startswith("PROBLEM: ")]
    assert problems and all(damaged in p for p in problems), log
