"""The DataModule's loaders for real: worker-count independence, multi-process DDP (gloo) over uneven shards,
resume mid-epoch and across world sizes, exact quotas, exclusion of incomplete samples, unreadable members."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from m3leo_stream import shard_format as sf
from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.planner import region_quotas
from m3leo_stream.reader import UnreadableSample

WORKER = Path(__file__).with_name("ddp_loader_worker.py")
INPUTS, TARGETS = ["modisveg"], ["esawc"]


def _dm(root, batch_size, **kw) -> M3LEODataModule:
    dm = M3LEODataModule(str(root), inputs=INPUTS, targets=TARGETS, batch_size=batch_size, seed=0, **kw)
    dm.setup("fit")
    return dm


def train_keys(dm: M3LEODataModule, epochs=(0,), loader=None) -> list[list[list[str]]]:
    loader = loader or dm.train_dataloader()
    out = []
    for e in epochs:
        loader.batch_sampler.set_epoch(e)
        out.append([b["key"] for b in loader])
    return out


def split_keys(root: Path, split: str) -> list[str]:
    t = pq.read_table(root / "index.parquet", columns=["key", "split"]).to_pydict()
    return [k for k, s in zip(t["key"], t["split"]) if s == split]


def run_ranks(root: Path, out: Path, world: int, batch: int, *extra: str, timeout: float = 300) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
               "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root), str(out), "--batch-size", str(batch),
                                       *extra], env=env, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{world} ranks did not finish within {timeout} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{p.stderr.read()[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_batches_are_raw_arrays_in_registry_shapes_and_independent_of_workers(uneven_shards):
    dm0 = _dm(uneven_shards, 4, num_workers=0)
    dm2 = _dm(uneven_shards, 4, num_workers=2)
    dmp = _dm(uneven_shards, 4, num_workers=2, worker_mode="process")
    assert train_keys(dm0, (0, 1)) == train_keys(dm2, (0, 1)) == train_keys(dmp, (0, 1))
    # the same arrays whether read by threads (read ahead) or by worker processes (through shared memory)
    for a, b in zip(dm2.train_dataloader(), dmp.train_dataloader()):
        for name in INPUTS + TARGETS:
            assert torch.equal(a[name], b[name])
    batch = next(iter(dm2.train_dataloader()))
    for name in INPUTS + TARGETS:
        m = dm2.modalities[name]
        assert batch[name].shape == (4, *m.shape) and batch[name].dtype == getattr(torch, m.dtype)
    assert batch["region"].dtype == torch.int64 and batch["valid"].all()
    index = pq.read_table(uneven_shards / "index.parquet").to_pydict()
    row = index["key"].index(batch["key"][0])
    assert batch["lon"][0].item() == index["lon"][row] and batch["lat"][0].item() == index["lat"][row]
    assert dm2.region_names[batch["region"][0]] == index["region"][row]
    # only the requested members were read: bytes equal the members' sizes
    m = dm2.loader_metrics()
    assert m["samples"] > 0 and m["bytes"] > 0 and m["retries"] == 0 and m["wait_s"] > 0


@pytest.mark.parametrize("world,batch,mode", [(2, 3, "thread"), (3, 2, "process")])
def test_ddp_equal_batches_no_duplicates_exact_eval(uneven_shards, tmp_path, world, batch, mode):
    records = run_ranks(uneven_shards, tmp_path, world, batch, "--workers", "1", "--worker-mode", mode)
    reference = train_keys(_dm(uneven_shards, world * batch, num_workers=0), (0, 1))
    assert len({tuple(r["lengths"]) for r in records}) == 1
    for epoch in range(2):
        per_rank = [r["train"][epoch] for r in records]
        assert len({len(b) for b in per_rank}) == 1
        # global batch g is the concatenation of the ranks' parts: the same as one process with the global batch
        merged = [sum((per_rank[r][g] for r in range(world)), []) for g in range(len(per_rank[0]))]
        assert merged == reference[epoch]
        flat = [k for b in merged for k in b]
        assert len(flat) == len(set(flat))
        # 93 train samples, global batch 6: 15 full batches, 3 samples wait for a later epoch
        assert len(flat) == 93 // 6 * 6
    val = split_keys(uneven_shards, "val")
    assert len({len(r["val"]) for r in records}) == 1
    seen = [k for r in records for b in r["val"] for k, ok in b if ok]
    assert sorted(seen) == sorted(val)
    padding = [k for r in records for b in r["val"] for k, ok in b if not ok]
    assert len(padding) == len(records[0]["val"]) * world * batch - len(val)


@pytest.mark.parametrize("before,after", [
    (("thread", 2), ("thread", 2)), (("process", 2), ("process", 2)),
    # a checkpoint resumes whatever reader set-up the run had or has now
    (("process", 2), ("thread", 2)), (("thread", 2), ("process", 1)), (("thread", 2), ("thread", 0)),
])
def test_resume_mid_epoch_continues_with_the_next_batch(uneven_shards, before, after):
    full = train_keys(_dm(uneven_shards, 4, num_workers=2), (0,))[0]
    dm = _dm(uneven_shards, 4, num_workers=before[1], worker_mode=before[0])
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(0)
    first = []
    for i, b in enumerate(loader):
        first.append(b["key"])
        if i == 4:
            break
    state = loader.state_dict()
    del loader
    dm2 = _dm(uneven_shards, 4, num_workers=after[1], worker_mode=after[0])
    resumed = dm2.train_dataloader()
    resumed.batch_sampler.set_epoch(0)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["m3leo"]["batches"] == 5  # a checkpoint before the first resumed batch
    rest = []
    for i, b in enumerate(resumed):
        rest.append(b["key"])
        if i == 1:
            assert resumed.state_dict()["m3leo"]["batches"] == 7  # positions stay absolute after a resume
    assert first + rest == full
    # the next epoch starts at its first batch
    resumed.batch_sampler.set_epoch(1)
    assert [b["key"] for b in resumed] == train_keys(_dm(uneven_shards, 4, num_workers=0), (1,))[0]


def test_elastic_resume_from_two_ranks_to_one(uneven_shards, tmp_path):
    records = run_ranks(uneven_shards, tmp_path, 2, 3, "--workers", "1", "--stop-after", "4")
    full = train_keys(_dm(uneven_shards, 6, num_workers=1), (0,))[0]
    merged = [records[0]["train"][0][g] + records[1]["train"][0][g] for g in range(4)]
    assert merged == full[:4]
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    dm = _dm(uneven_shards, 6, num_workers=1)
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(0)
    loader.load_state_dict(state)
    assert merged + [b["key"] for b in loader] == full
    # a different global batch would silently shift every later batch: refused, naming what differs
    other = _dm(uneven_shards, 4, num_workers=1).train_dataloader()
    with pytest.raises(ValueError, match="global_batch"):
        other.load_state_dict(state)


def test_region_weights_give_exact_quotas_through_the_loader(uneven_shards):
    weights = {"conus": 1.0, "europe": 1.0, "pakin": 2.0}
    dm = _dm(uneven_shards, 4, num_workers=0, region_weights=weights, samples_per_epoch=80)
    quotas = region_quotas(dm.catalog("train").region_counts(), weights, 80)
    assert quotas == {"china": 0, "conus": 20, "europe": 20, "pakin": 40}
    for epoch in range(2):
        counts = Counter()
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        for b in loader:
            counts.update(dm.region_names[int(r)] for r in b["region"])
        assert dict(counts) == {k: v for k, v in quotas.items() if v}


def test_samples_missing_a_member_are_excluded_at_planning(small_shards, caplog):
    dm = M3LEODataModule(str(small_shards), inputs=["s1grd"], targets=["gunw"], batch_size=1, num_workers=0)
    dm.setup()
    with caplog.at_level("INFO"):
        cat = dm.catalog("train")
    t = pq.read_table(small_shards / "index.parquet", columns=["split", "gunw_nbytes"]).to_pydict()
    missing = sum(1 for s, n in zip(t["split"], t["gunw_nbytes"]) if s == "train" and n is None)
    assert missing > 0 and cat.excluded == {"gunw": missing}
    assert "excluded for missing members" in caplog.text
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(keys) == len(cat)


def _corrupt_member(root: Path, tmp: Path) -> tuple[Path, str, str]:
    copy = tmp / "corrupt"
    shutil.copytree(root, copy)
    t = pq.read_table(copy / "index.parquet").to_pydict()
    i = next(i for i, s in enumerate(t["split"]) if s == "train")
    shard, key = t["shard"][i], t["key"][i]
    with open(copy / shard, "r+b") as f:
        f.seek(t["esawc_offset"][i])
        f.write(b"JUNKJUNK")
    return copy, shard, key


def test_unreadable_member_fails_naming_it_or_is_substituted(uneven_shards, tmp_path):
    root, shard, key = _corrupt_member(uneven_shards, tmp_path)
    bad = next(g for g, b in enumerate(train_keys(_dm(uneven_shards, 4, num_workers=0))[0]) if key in b)
    for workers in (0, 2):  # read on the spot, or read ahead: the error comes with the batch that holds it
        dm = _dm(root, 4, num_workers=workers)
        got = 0
        with pytest.raises(UnreadableSample) as err:
            for _ in dm.train_dataloader():
                got += 1
        assert got == bad
        assert shard in str(err.value) and key in str(err.value) and "esawc" in str(err.value)
    dm = _dm(root, 4, num_workers=0, on_unreadable="substitute")
    loader = dm.train_dataloader()
    keys = [k for b in loader for k in b["key"]]
    assert key not in keys and len(keys) == len(loader) * 4
    assert dm.loader_metrics()["substitutions"] == 1
    # the substitute comes from the same region and is the same on every run
    dm2 = _dm(root, 4, num_workers=0, on_unreadable="substitute")
    assert [k for b in dm2.train_dataloader() for k in b["key"]] == keys


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read worker RSS")
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_reader_memory_stays_flat_over_epochs(uneven_shards, mode):
    dm = _dm(uneven_shards, 4, num_workers=1, worker_mode=mode)
    loader = dm.train_dataloader()
    rss = []
    for epoch in range(4):
        loader.batch_sampler.set_epoch(epoch)
        it = iter(loader)
        for _ in it:
            pass
        if mode == "process":
            workers = loader._iterator._workers  # persistent workers: the same processes every epoch
            rss.append(sum(_rss(w.pid) for w in workers))
        else:
            rss.append(_rss(os.getpid()))  # the reader threads live in this process
    assert rss[-1] <= rss[1] * 1.10 + 8e6, rss


# -- band selection --------------------------------------------------------------------------------------------
DEMO_MODS = ["s1grd", "s2rgbm", "gssic"]
DEMO_TRANSFORMS = {"grid": {"size": 64}, "modalities": {"s1grd": {"bands": ["summer_*"]},
                                                        "s2rgbm": {"bands": ["07_*"]}}}


def _demo(root, transforms, **kw) -> M3LEODataModule:
    dm = M3LEODataModule(str(root), inputs=DEMO_MODS, batch_size=3, seed=0, transforms=transforms, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("workers,mode", [(0, "thread"), (2, "thread"), (2, "process")])
def test_only_the_bands_the_transforms_use_are_read(small_shards, workers, mode):
    """The demo's selection (s1grd summer_*, s2rgbm 07_*, gssic without its lsmap flag band): batches hold exactly
    those bands, bit-identical to all bands then selected, in every worker mode; bytes read drop to the members'
    headers plus the selected bands (exact with coalesce_gap=0), under a quarter of reading everything."""
    full = _demo(small_shards, None, num_workers=workers, worker_mode=mode, coalesce_gap=0)
    sel = _demo(small_shards, DEMO_TRANSFORMS, num_workers=workers, worker_mode=mode, coalesce_gap=0)
    assert full.bands is None
    assert sel.bands == {"s1grd": [8, 9, 10, 11], "s2rgbm": [18, 19, 20], "gssic": list(range(37))}
    keys = []
    for a, b in zip(full.train_dataloader(), sel.train_dataloader(), strict=True):
        assert a["key"] == b["key"]
        keys += b["key"]
        for name in DEMO_MODS:
            m = sel.modalities[name]
            assert b[name].shape == (3, len(sel.bands[name]), *m.shape[1:])
            assert a[name][:, sel.bands[name]].numpy().tobytes() == b[name].numpy().tobytes(), name
            assert b["bands"][name] == [m.bands[i] for i in sel.bands[name]]
            assert a["bands"][name] == list(m.bands)
    index = pq.read_table(small_shards / "index.parquet").to_pydict()
    rows = [index["key"].index(k) for k in keys]
    whole = part = 0
    for name in DEMO_MODS:
        m = sel.modalities[name]
        for r in rows:
            nb = index[f"{name}_nbytes"][r]
            whole += nb
            part += nb - m.nbytes + len(sel.bands[name]) * m.nbytes // len(m.bands)
            if len(sel.bands[name]) < len(m.bands):  # with the chunk digests that verify the bands read
                part += -sf.chunk_digests_range(0, len(m.bands))[0]
    assert full.loader_metrics()["bytes"] == whole
    assert sel.loader_metrics()["bytes"] == part
    assert part / whole < 0.25


def test_device_transforms_give_the_same_batches_from_selected_bands(small_shards):
    """What the model sees is bit-identical whether the loader read all bands or only the selected ones."""
    full = _demo(small_shards, DEMO_TRANSFORMS, num_workers=0)
    full.bands = None  # this one reads everything, as before band selection
    sel = _demo(small_shards, DEMO_TRANSFORMS, num_workers=0)
    t = sel.device_transforms(train=True)
    for step, (a, b) in enumerate(zip(full.train_dataloader(), sel.train_dataloader(), strict=True)):
        assert a["s2rgbm"].shape[1] == 36 and b["s2rgbm"].shape[1] == 3
        x, y = t(a, step=step), t(b, step=step)
        assert set(x) == set(y)
        for k, v in x.items():
            if torch.is_tensor(v):
                assert v.numpy().tobytes() == y[k].numpy().tobytes(), k
        if step == 2:
            break
    assert 0 < sel.loader_metrics()["bytes"] < 0.25 * full.loader_metrics()["bytes"]


# -- optional modalities ---------------------------------------------------------------------------------------

MIXED_INPUTS = ["s2rgbm", "gssic", "gunw"]


def _presence(root: Path) -> dict[str, dict[str, bool]]:
    """key -> modality -> whether the index has its member."""
    t = pq.read_table(root / "index.parquet").to_pydict()
    return {k: {m: t[f"{m}_nbytes"][i] is not None for m in MIXED_INPUTS} for i, k in enumerate(t["key"])}


def _sample_json(root: Path, key: str) -> dict:
    t = pq.read_table(root / "index.parquet").to_pydict()
    i = t["key"].index(key)
    with open(root / t["shard"][i], "rb") as f:
        f.seek(t["json_offset"][i])
        return json.loads(f.read(t["json_nbytes"][i]))


def test_optional_modalities_keep_every_sample_and_required_ones_exclude(mixed_shards, caplog):
    has = _presence(mixed_shards)
    train = set(split_keys(mixed_shards, "train"))
    with caplog.at_level("INFO"):
        opt = M3LEODataModule(str(mixed_shards), inputs=MIXED_INPUTS, optional=["gssic", "gunw"], batch_size=4,
                              num_workers=0)
        cat = opt.catalog("train")
    assert len(cat) == len(train) and cat.excluded == {}
    assert cat.presence["europe"]["gunw"] == 0 and 0 < cat.presence["conus"]["gunw"] < cat.region_counts()["conus"]
    assert "europe: s2rgbm" in caplog.text and "gunw 0" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        req = M3LEODataModule(str(mixed_shards), inputs=MIXED_INPUTS, batch_size=4, num_workers=0).catalog("train")
    assert len(req) == sum(all(has[k].values()) for k in train) and req.region_counts()["europe"] == 0
    assert "excluded for missing members" in caplog.text
    with pytest.raises(ValueError, match="optional modalities"):
        M3LEODataModule(str(mixed_shards), inputs=MIXED_INPUTS, optional=["esawc"])
    with pytest.raises(ValueError, match="min_inputs_present"):
        M3LEODataModule(str(mixed_shards), inputs=MIXED_INPUTS, min_inputs_present=4)


def test_batches_flag_absent_members_hold_zeros_and_never_read_them(mixed_shards, monkeypatch):
    from m3leo_stream.reader import ShardDataset

    has = _presence(mixed_shards)
    planned: list[tuple[str, str]] = []
    plan = ShardDataset._plan_requests

    def recording(self, rows, slots):
        reqs = plan(self, rows, slots)
        planned.extend((self.index.key[int(rows[p.slot])].decode(), p.name) for r in reqs for p in r.parts)
        return reqs

    monkeypatch.setattr(ShardDataset, "_plan_requests", recording)
    dm = M3LEODataModule(str(mixed_shards), inputs=MIXED_INPUTS, optional=["gssic", "gunw"], batch_size=4,
                         num_workers=0)
    seen, absent = 0, 0
    for b in dm.train_dataloader():  # the batch arrays are reused across batches: absent slots must be re-zeroed
        for i, key in enumerate(b["key"]):
            for m in MIXED_INPUTS:
                assert bool(b[f"{m}_present"][i]) == has[key][m]
                if not has[key][m]:
                    absent += 1
                    assert not b[m][i].any(), f"{key} {m}: absent but not zero"
                else:
                    assert b[m][i].any()
            seen += 1
    assert seen == len(dm.catalog("train")) and absent > 0
    assert not [(k, m) for k, m in planned if not has[k][m]], "an absent member was requested"
    assert {(k, m) for k, m in planned} == {(k, m) for k in split_keys(mixed_shards, "train") for m in MIXED_INPUTS
                                            if has[k][m]}


def test_transforms_zero_absent_members_and_mask_missing_bands(mixed_shards):
    has = _presence(mixed_shards)
    cfg = {"grid": {"size": 32}, "train": {"noise": {"p": 1.0, "std": 0.5}}}
    dm = M3LEODataModule(str(mixed_shards), inputs=MIXED_INPUTS, optional=["gssic", "gunw"], batch_size=4,
                         num_workers=0, transforms=cfg)
    t = dm.device_transforms(train=True)
    s2 = dm.modalities["s2rgbm"]
    missing_seen = 0
    for step, raw in enumerate(dm.train_dataloader()):
        out = t(raw, step=step)
        for i, key in enumerate(out["key"]):
            for m in ("gssic", "gunw"):
                pr = has[key][m]
                assert bool(out[f"{m}_present"][i]) == pr
                if not pr:  # zeros (the mean), nothing valid, no channel valid — after noise and geometry
                    assert not out[m][i].any() and not out[f"{m}_valid"][i].any()
                    assert not out[f"{m}_channel_valid"][i].any()
            missing = set(_sample_json(mixed_shards, key)["modalities"]["s2rgbm"].get("missing_bands", []))
            chan = out["s2rgbm_channel_valid"][i]
            assert [t.channels["s2rgbm"][j] for j in range(len(chan)) if not chan[j]] == \
                [b for b in s2.bands if b in missing]  # the build's record, derived on the device
            if missing:
                missing_seen += 1
                gone = [j for j, b in enumerate(t.channels["s2rgbm"]) if b in missing]
                assert not out["s2rgbm"][i, gone].any()
                # a missing month does not invalidate the others: the raw present bands decide
                x = raw["s2rgbm"][i]
                keep = [j for j, b in enumerate(s2.bands) if b not in missing]
                want = (x[keep] != 0).all(0)
                _, valid, _ = t.normalize_input_channels("s2rgbm", x[None], raw["bands"]["s2rgbm"])
                assert want.any() and torch.equal(valid[0, 0], want)
        assert torch.isfinite(out["gssic"]).all() and torch.isfinite(out["gunw"]).all()
    assert missing_seen > 0


def test_the_plan_fingerprint_includes_the_policy(mixed_shards):
    a = M3LEODataModule(str(mixed_shards), inputs=["s2rgbm"], targets=["esawc"], optional=["s2rgbm"],
                        batch_size=4, num_workers=0)
    b = M3LEODataModule(str(mixed_shards), inputs=["s2rgbm"], targets=["esawc"], batch_size=4, num_workers=0)
    assert len(a.catalog("train")) == len(b.catalog("train"))  # the same samples: only the policy differs
    la = a.train_dataloader()
    it = iter(la)
    next(it)
    state = la.state_dict()
    assert state["m3leo"]["policy"] == {"optional": ["s2rgbm"], "min_inputs_present": 1}
    with pytest.raises(ValueError, match="policy"):
        b.train_dataloader().load_state_dict(state)
    a2 = M3LEODataModule(str(mixed_shards), inputs=["s2rgbm"], targets=["esawc"], optional=["s2rgbm"],
                         batch_size=4, num_workers=0)
    a2.train_dataloader().load_state_dict(state)  # the same policy resumes


def _samples(dm: M3LEODataModule) -> list[tuple[str, bytes]]:
    """(key, its pixels) of every sample of epoch 0 of the train loader."""
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(0)
    out = []
    for b in loader:
        for i, k in enumerate(b["key"]):
            out.append((k, b"".join(b[m][i].numpy().tobytes() for m in INPUTS + TARGETS)))
    return out


def test_an_epoch_with_corrupt_members_substitutes_them_and_delivers_no_wrong_sample(uneven_shards, tmp_path):
    """Three members with one flipped byte each, under ``on_unreadable=substitute`` and reading threads: the epoch
    completes, none of the three is delivered, every delivered sample carries exactly its own pixels, and the
    mismatches and substitutions are counted."""
    root = tmp_path / "corrupt"
    shutil.copytree(uneven_shards, root)
    rows = [r for r in pq.read_table(root / "index.parquet").to_pylist() if r["split"] == "train"][::7][:3]
    for r in rows:
        with open(root / r["shard"], "r+b") as f:
            f.seek(r["modisveg_offset"] + r["modisveg_nbytes"] - 40)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x20]))
    clean = dict(_samples(_dm(uneven_shards, 4, num_workers=0)))
    dm = _dm(root, 4, num_workers=2, on_unreadable="substitute")
    got = _samples(dm)
    bad = {r["key"] for r in rows}
    assert len(got) == len(clean) and not bad & {k for k, _ in got}
    assert all(pixels == clean[k] for k, pixels in got)
    m = dm.loader_metrics()
    assert m["checksum_failures"] >= 3 and m["substitutions"] >= 3


def test_a_root_without_checksums_is_read_unverified_with_a_warning(uneven_shards, tmp_path, caplog):
    """A format-version-1 root (no digest columns) still loads and reads the same batches, and says it is not
    verified."""
    root = tmp_path / "v1"
    shutil.copytree(uneven_shards, root)
    t = pq.read_table(root / "index.parquet")
    pq.write_table(t.drop([c for c in t.column_names if c.endswith("xxh3")]), root / "index.parquet")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["checksum"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        old = _dm(root, 4, num_workers=0)
    assert "has no member checksums (format version 1)" in caplog.text
    assert not old._index.checksums
    assert _samples(old) == _samples(_dm(uneven_shards, 4, num_workers=0))


def test_last_training_epoch_is_where_max_epochs_or_max_steps_ends():
    from types import SimpleNamespace

    from m3leo_stream.datamodule import last_training_epoch

    def t(max_epochs, max_steps, limit=None, accumulate=1):
        return SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, limit_train_batches=limit,
                               accumulate_grad_batches=accumulate)

    assert last_training_epoch(None, 10) is None
    assert last_training_epoch(t(-1, -1), 10) is None
    assert last_training_epoch(t(3, -1), 10) == 2
    assert last_training_epoch(t(100, 25), 10) == 2  # steps 21..25 are in epoch 2
    assert last_training_epoch(t(100, 20), 10) == 1
    assert last_training_epoch(t(100, 20, accumulate=2), 10) == 3
    assert last_training_epoch(t(-1, 25, limit=0.5), 10) is None  # shortened epochs: not known from the plan
