"""The whole pipeline: CPU vs CUDA, and on a real built shard root."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transforms_cases import _pattern, _small

from m3leo_stream.transforms import build_device_transforms


def test_cpu_and_cuda_agree(small_stats):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available on this machine: the CPU vs CUDA agreement runs on the GPU machine")
    aug = {"resized_crop": {"p": 0.7}, "noise": {"p": 0.0}}
    t = _small(small_stats, aug=aug)
    b = _pattern(8)
    cpu = t(b, step=1)
    gpu = t({k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}, step=1)
    for k in ("sar", "opt", "crs"):
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], atol=1e-4, rtol=1e-4)
    for k in ("lab", "sar_valid", "lab_valid", "crs_valid"):
        assert (gpu[k].cpu() != cpu[k]).float().mean() < 1e-3, k  # nearest ties may fall differently


def test_on_built_shards(small_shards):
    """Registry and stats.json of a real shard root, samples decoded from its tars: every modality transforms."""
    from m3leo_stream.shard_root import ShardRoot

    root = ShardRoot(str(small_shards))
    rows = [r for r in root.read_index().to_pylist() if r["split"] == "train"]
    names = [n for n in root.modalities if all(r.get(f"{n}_offset") is not None for r in rows[:3])]
    inputs = [n for n in names if root.modalities[n].kind in ("sar_db", "optical", "coherence", "phase")]
    targets = [n for n in names if n not in inputs]
    assert {"s1grd", "s2rgbm", "esawc"} <= set(names)
    batch = {n: torch.from_numpy(np.stack([root.read_member(r, n) for r in rows[:3]])) for n in names}
    aug = {"resized_crop": {"p": 0.5}, "modality_dropout": {"p": 0.2}}
    t = build_device_transforms({"train": aug, "modalities": {"s1grd": {"ratio": True}}}, root.modalities,
                                root.stats, inputs=inputs, targets=targets, train=True, rank=1)
    out = t(batch, step=0)
    for n in inputs:
        assert out[n].dtype == torch.float32 and out[n].shape == (3, len(t.channels[n]), 448, 448)
        assert torch.isfinite(out[n]).all() and out[f"{n}_valid"].shape == (3, 1, 448, 448)
    for n in targets:
        assert out[f"{n}_valid"].dtype == torch.bool and out[f"{n}_valid"].shape[-1] == out[n].shape[-1]
        assert torch.isfinite(out[n].float()).all()
    assert out["esawc"].dtype == torch.int64 and out["esawc"].max() < 11
