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
