"""bench/gpu_step.py keeps working on CPU: its tiny configuration runs end to end (generated shards, the real
pretrain_mae task in a Lightning Trainer, fed and cached), and every figure of the results JSON is there and
consistent with independent computations (bytes per sample from the registry, FLOPs of the model counted here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_step.py"
VARIANTS = ("fed", "cached_raw", "cached")
VARIANT_KEYS = {"steps_timed", "step_s", "step_s_median", "step_s_p90", "samples_per_s", "window_s",
                "training_speed", "data_wait_frac", "peak_mem_gib", "syncs_per_step", "sync_sites", "tflops", "mfu"}
RUN_KEYS = {"px", "measured", "batch", "batch_source", "workers", "prefetch_factor", "host_memory_note",
            "bytes_per_batch", "bytes_per_sample", "flops_per_step", "flops_by_op", "flops_attention_counted",
            "data_share", "data_share_io_h2d", "data_share_transforms", "h2d", *VARIANTS}
TOP_KEYS = {"bench", "experiment", "device", "versions", "host", "config", "runs", "wall_s"}
CONFIG_KEYS = {"px", "model", "inputs", "precision", "warmup_steps", "timed_steps", "sync_steps", "chips",
               "train_chips", "data", "tiny_cpu_config"}


def check_schema(res: dict) -> None:
    """Every field present with sane values (for any run of the script, CPU or GPU)."""
    assert TOP_KEYS <= set(res), sorted(TOP_KEYS - set(res))
    assert res["bench"] == "gpu_step" and res["experiment"] == "pretrain_mae"
    assert {"type", "name", "tag", "peak_flops", "peak_flops_source"} <= set(res["device"])
    assert {"torch", "lightning"} <= set(res["versions"]) and all(res["versions"][k] for k in ("torch", "lightning"))
    cfg = res["config"]
    assert CONFIG_KEYS <= set(cfg), sorted(CONFIG_KEYS - set(cfg))
    assert cfg["inputs"] == ["s1grd", "s2rgbm", "gssic"]
    assert {"dim", "depth", "heads", "patch_size"} <= set(cfg["model"])
    assert cfg["chips"] >= cfg["train_chips"] > 0
    cuda = res["device"]["type"] == "cuda"
    assert [r["px"] for r in res["runs"]] == cfg["px"]
    for r in res["runs"]:
        assert RUN_KEYS <= set(r), sorted(RUN_KEYS - set(r))
        assert r["batch"] > 0 and r["flops_per_step"] > 0
        assert r["bytes_per_batch"] == r["h2d"]["bytes_per_batch"] == r["bytes_per_sample"] * r["batch"]
        assert math.isclose(r["data_share"], r["data_share_io_h2d"] + r["data_share_transforms"], abs_tol=1e-9)
        assert r["data_share"] < 1
        assert r["h2d"]["achieved_gbps"] > 0
        assert (r["h2d"]["copy_gbps"] is not None) == cuda
        for v in VARIANTS:
            x = r[v]
            assert VARIANT_KEYS <= set(x), (v, sorted(VARIANT_KEYS - set(x)))
            assert x["steps_timed"] == cfg["timed_steps"] == len(x["step_s"])
            assert all(s > 0 for s in x["step_s"])
            assert min(x["step_s"]) <= x["step_s_median"] <= x["step_s_p90"] <= max(x["step_s"])
            assert math.isclose(x["samples_per_s"], r["batch"] * x["steps_timed"] / x["window_s"], rel_tol=1e-9)
            assert 0 <= x["data_wait_frac"] <= 1
            # TrainingSpeed's window is the timed one: the two samples/s agree
            assert math.isclose(x["training_speed"]["samples_per_s_per_device"], x["samples_per_s"], rel_tol=0.1)
            assert math.isclose(x["tflops"], r["flops_per_step"] / x["step_s_median"] / 1e12, rel_tol=1e-9)
            peak = res["device"]["peak_flops"]
            assert (x["mfu"] is None) == (peak is None)
            if peak:
                assert math.isclose(x["mfu"], r["flops_per_step"] / x["step_s_median"] / peak, rel_tol=1e-9)
            assert (x["peak_mem_gib"] is not None) == cuda
            if cuda:
                assert 0 < x["peak_mem_gib"] and x["syncs_per_step"] >= 0
            else:
                assert x["syncs_per_step"] is None
        # the fed step waits for data, the cached one does not
        assert r["fed"]["data_wait_frac"] > r["cached"]["data_wait_frac"]


def _expected_bytes_per_sample() -> int:
    """The bands pretrain_mae's transforms read (all but gssic's categorical flag band) plus the metadata."""
    from m3leo_stream.modalities import REGISTRY

    arrays = 0
    for name in ("s1grd", "s2rgbm", "gssic"):
        m = REGISTRY[name]
        used = [k for k in m.band_kinds if k != "categorical"]
        arrays += len(used) * math.prod(m.shape[1:]) * np.dtype(m.np_dtype).itemsize
    return arrays + 8 + 8 + 8 + 1 + 3  # region (int64), lon, lat (float64), valid, <mod>_present ×3 (bool)


def _model_flops(root: Path, res: dict) -> int:
    """FLOPs of one forward + backward of the configured model, counted here on random inputs."""
    from hydra import compose, initialize_config_dir
    from torch.utils.flop_counter import FlopCounterMode

    from m3leo_stream.models import MultiModalMAE
    from m3leo_stream.train import CONFIG_DIR, build_datamodule, describe_data

    px, b = res["config"]["px"][0], res["runs"][0]["batch"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=pretrain_mae", f"data.root={root}", "data.num_workers=0",
                                f"transforms.grid.size={px}"])
    info, _ = describe_data(cfg, build_datamodule(cfg))
    m = res["config"]["model"]
    model = MultiModalMAE(info.in_channels, size=m["size"], patch_size=m["patch_size"], dim=m["dim"],
                          depth=m["depth"], heads=m["heads"], decoder_dim=m["decoder_dim"],
                          decoder_depth=m["decoder_depth"], decoder_heads=m["decoder_heads"])
    batch = {k: torch.randn(b, c, px, px) for k, c in info.in_channels.items()}
    with FlopCounterMode(display=False) as fc:
        model(batch)["loss"].backward()
    return int(fc.get_total_flops())


@pytest.mark.slow
def test_gpu_step_cpu_mode(tmp_path):
    out, work = tmp_path / "gpu_step.json", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(SCRIPT), "--chips", "8", "--steps", "2", "--warmup", "2",
                        "--peak-flops", "1e12", "--work-dir", str(work), "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    check_schema(res)
    assert res["device"]["type"] == "cpu" and res["device"]["tag"] == "cpu" and res["device"]["peak_flops"] == 1e12
    assert res["versions"]["torch"] == torch.__version__
    cfg = res["config"]
    assert cfg["tiny_cpu_config"] and cfg["precision"] == "32-true" and cfg["px"] == [32]
    assert (cfg["model"]["dim"], cfg["model"]["depth"], cfg["model"]["heads"], cfg["model"]["patch_size"]) == \
        (32, 1, 2, 8)
    assert cfg["chips"] == 8 and (cfg["warmup_steps"], cfg["timed_steps"]) == (2, 2)
    r = res["runs"][0]
    assert r["batch"] == 4 and r["batch_source"] == "cpu default"
    assert r["bytes_per_sample"] == _expected_bytes_per_sample()
    assert r["flops_per_step"] == _model_flops(work / "shards", res)
    # step times on a shared CPU move by several x with the load (the cached tiny step took 50-800 ms), so the
    # fed-vs-cached comparison is checked through the data wait (check_schema), which stays far apart
    for needle in ("loader-fed", "cached (compute ceiling)", "data share of a step", "H2D:", "MFU"):
        assert needle in p.stdout, needle
    print(f"gpu_step CPU mode: {elapsed:.0f} s")


def test_committed_cpu_results_have_every_field():
    path = REPO / "bench" / "results" / "gpu_step_cpu.json"
    check_schema(json.loads(path.read_text()))


# --- the GPU-only control flow, driven on CPU with a fake fit ------------------------------------------------------

def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_step_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    import argparse

    base = dict(cuda=True, device=torch.device("cpu"), batch=None, min_batch=8, max_batch=4096, workers=8,
                prefetch=2, warmup_eff=2, steps=2, sync_steps=3)
    return argparse.Namespace(**{**base, **kw})


def test_batch_search_stops_at_the_first_oom(monkeypatch):
    g = _bench()
    raw = {"s1grd": torch.zeros(8, 2, 4, 4), "valid": torch.ones(8, dtype=torch.bool), "key": list("abcdefgh")}
    sizes = []

    def fake_fit(a, cfg, variant, plan, batch=None, record=True):
        assert variant == "cached_raw" and not record
        n = batch["s1grd"].shape[0]
        assert batch["valid"].shape[0] == len(batch["key"]) == n  # tiled to the tried size
        sizes.append(n)
        if n >= 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        return {}

    monkeypatch.setattr(g, "compose_cfg", lambda a, root, px, b, *rest: {"batch": b})
    monkeypatch.setattr(g, "read_raw_batch", lambda cfg: raw)
    monkeypatch.setattr(g, "fit", fake_fit)
    res = g.search_batch(_args(), Path("/x"), 224)
    assert sizes == [8, 16, 32, 64, 128] and res["largest_fit"] == 64
    assert res["tried"] == {8: True, 16: True, 32: True, 64: True, 128: False}

    def other_error(*a, **k):
        raise RuntimeError("shape mismatch")  # not an OOM: must surface, not end the search quietly

    monkeypatch.setattr(g, "fit", other_error)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        g.search_batch(_args(), Path("/x"), 224)


def test_an_unforeseen_oom_halves_the_searched_batch(monkeypatch):
    g = _bench()
    tried = []

    def fake_measure_at(a, root, px, batch):
        tried.append(batch)
        if batch > 16:
            raise RuntimeError("CUDA error: out of memory")
        return {"batch": batch}

    monkeypatch.setattr(g, "search_batch", lambda a, root, px: {"largest_fit": 64})
    monkeypatch.setattr(g, "measure_at", fake_measure_at)
    run = g.measure(_args(), Path("/x"), 224)
    assert tried == [64, 32, 16] and run["batch"] == 16 and run["oom_retries"] == [64, 32]
    tried.clear()
    with pytest.raises(RuntimeError):  # a batch given by --batch is not changed behind the user's back
        g.measure(_args(batch=64), Path("/x"), 224)
    assert tried == [64]


def test_host_plan_lowers_prefetch_then_workers_then_batch(monkeypatch):
    g = _bench()
    gb = 2**30
    monkeypatch.setattr(g, "mem_available", lambda: 100 * gb)  # budget 60 GiB
    per = gb // 100  # ~10.7 MB per sample
    # fits as asked: (8 × 2 + 3) batches × 2 copies × 64 samples ≈ 26 GiB
    assert g.host_plan(_args(), 64, per) == (64, 8, 2, None)
    # 512 samples ≈ 5.1 GiB a batch: prefetch 1 and (w + 3) × 2 × 5.1 ≤ 60 → w = 2
    b, w, p, note = g.host_plan(_args(), 512, per)
    assert (b, w, p) == (512, 2, 1) and "prefetch_factor 1" in note and "2 loader workers" in note
    # 2048 samples: even 1 worker is too much, the searched batch halves until (1 + 3) × 2 × b fits
    b, w, p, note = g.host_plan(_args(), 2048, per)
    assert (w, p) == (1, 1) and b == 512 and "batch 512" in note
    # ... unless the batch was given
    b, w, p, note = g.host_plan(_args(batch=2048), 2048, per)
    assert b == 2048 and "kept" in note


def test_peak_flops_table_and_device_tag(monkeypatch):
    g = _bench()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert g.peak_flops(_args(peak_flops=None)) == (756e12, "table: H100 PCIe bf16 dense")
    assert g.device_tag(_args()) == "h100-pcie"
    for name, flops in (("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert g.peak_flops(_args(peak_flops=None))[0] == flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA L4")
    assert g.peak_flops(_args(peak_flops=None))[0] is None
    assert g.peak_flops(_args(peak_flops=242e12))[0] == 242e12
    assert g.peak_flops(_args(cuda=False, peak_flops=None))[0] is None


def test_merge_keeps_other_grids_of_the_same_setup(tmp_path):
    g = _bench()
    out = tmp_path / "r.json"

    def result(px, name="NVIDIA H200", dim=768):
        return {"device": {"name": name}, "versions": {"torch": "2.x"}, "wall_s": 10.0,
                "config": {"px": [px], "model": {"dim": dim}, "inputs": ["s1grd"], "precision": "bf16-mixed",
                           "warmup_steps": 10, "timed_steps": 10, "sync_steps": 3, "chips": 256},
                "runs": [{"px": px, "batch": px}]}

    out.write_text(json.dumps(result(448)))
    res = result(224)
    g.merge_earlier(res, out)
    assert [r["px"] for r in res["runs"]] == res["config"]["px"] == [224, 448] and res["wall_s"] == 20.0
    out.write_text(json.dumps(result(224)))
    res = result(224)
    g.merge_earlier(res, out)  # the same grid again: the new run replaces the old one
    assert res["config"]["px"] == [224] and len(res["runs"]) == 1
    for other in (result(448, name="NVIDIA A100-SXM4-80GB"), result(448, dim=1024)):
        out.write_text(json.dumps(other))
        with pytest.raises(SystemExit, match="another device"):
            g.merge_earlier(result(224), out)
