"""Embedding export end to end on tiny generated shards with a tiny encoder (deterministic): one row per chip of
every split with its land cover and terrain, resumable to the same result, each chip exactly once on two ranks;
encoder cards: the export round-trips, a mismatching input pipeline is refused and the matching one is rebuilt
from the card; pooling leaves absent inputs out."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

from m3leo_stream import encoder_card
from m3leo_stream.embed import CONFIG_DIR, embed_batch, run
from m3leo_stream.encoder_card import PipelineMismatch, export_encoder, load_encoder_and_card, require_pipeline
from m3leo_stream.models.mae import MultiModalEncoder
from m3leo_stream.shard_root import ShardRoot
from m3leo_stream.transforms import build_device_transforms

TRANSFORMS = {"grid": {"size": 32}, "modalities": {"s2rgbm": {"bands": ["07_*"]}}}
TINY = {"size": "custom", "patch_size": 8, "dim": 32, "depth": 1, "heads": 2}  # as test_train's TINY_MAE


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from shard_tools.build import BuildConfig, build
    from shard_tools.synth import SynthConfig, synth

    src = tmp_path_factory.mktemp("embed-src")
    synth(SynthConfig(str(src), ("conus", "europe"), 8, seed=5, modalities=("s2rgbm", "esawc", "srtmdem")),
          progress=False)
    out = tmp_path_factory.mktemp("embed-shards") / "root"
    build(BuildConfig(str(src), str(out), shard_size=40_000_000, workers=1, progress=False))
    return out


@pytest.fixture(scope="module")
def encoder(shards, tmp_path_factory) -> Path:
    """A tiny encoder exported with its card (what train.py's save_encoder writes)."""
    root = ShardRoot(str(shards))
    t = build_device_transforms(TRANSFORMS, root.modalities, root.stats, inputs=["s2rgbm"], targets=[], train=False)
    torch.manual_seed(0)
    enc = MultiModalEncoder({"s2rgbm": len(t.channels["s2rgbm"])}, **TINY)
    url = tmp_path_factory.mktemp("enc") / "encoder.pt"
    export_encoder(enc, str(url), t, root.stats, {"run_id": "test"})
    return url


def cfg_for(shards: Path, encoder: Path, out: Path, *extra: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("embed", [f"data.root={shards}", f"encoder={encoder}", f"out={out}",
                                 "splits=[train,val,test]", "data.num_workers=0", "data.eval_batch_size=4",
                                 "device=cpu", *extra])


def test_embed_end_to_end_and_resume(shards, encoder, tmp_path):
    enc_st = encoder.with_suffix(".safetensors")
    res = run(cfg_for(shards, enc_st, tmp_path / "full"))
    assert res["finished"] and res["samples"] == {"train": 12, "val": 2, "test": 2}
    t = pq.read_table(res["embeddings"])
    keys = ShardRoot(str(shards)).read_index(columns=["key"]).column("key").to_pylist()
    assert sorted(t.column("key").to_pylist()) == sorted(keys)  # every chip exactly once
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape == (16, 32) and np.isfinite(emb).all()
    lc = np.stack([t.column(c).to_numpy() for c in t.column_names if c.startswith("lc_") and c != "lc_valid_share"],
                  1)
    assert lc.shape[1] == 11 and np.allclose(lc.sum(1), 1.0, atol=1e-4)
    elev = t.column("elev_mean").to_numpy(zero_copy_only=False)
    assert np.isfinite(elev).sum() >= 14  # srtmdem lacks a few chips (NaN there)
    assert set(t.column("region").to_pylist()) == {"conus", "europe"}

    # interrupted after one batch per split (part_batches=1), then resumed: the same table
    part = tmp_path / "parts"
    first = run(cfg_for(shards, encoder, part, "splits=[train]", "part_batches=1", "limit_batches=1"))
    assert not first["finished"] and not (part / "embeddings.parquet").exists()
    again = run(cfg_for(shards, encoder, part, "splits=[train]", "part_batches=1"))
    assert again["finished"] and len(list((part / "parts" / "train").glob("*.parquet"))) == 3  # 12 chips / 4
    t2 = pq.read_table(again["embeddings"])
    train = t.filter(pc.equal(t.column("split"), "train"))
    assert t2.column("key").to_pylist() == train.column("key").to_pylist()
    np.testing.assert_allclose(np.stack(t2.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(train.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(cfg)


def test_two_ranks_each_chip_once(shards, encoder, tmp_path):
    cfg = cfg_for(shards, encoder, tmp_path / "ddp", "splits=[train]", "data.eval_batch_size=5")
    # fork: the ranks start without importing everything again (spawn takes most of a minute on a loaded CI box)
    torch.multiprocessing.start_processes(_rank, args=(2, _free_port(), cfg), nprocs=2, join=True,
                                          start_method="fork")
    t = pq.read_table(tmp_path / "ddp" / "embeddings.parquet")
    keys = t.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 12  # 12 train chips; the padded last global batch (2 × 5) dropped
    names = sorted(p.name for p in (tmp_path / "ddp" / "parts" / "train").glob("*.parquet"))
    assert any(n.startswith("r0000of0002") for n in names) and any(n.startswith("r0001of0002") for n in names)


def test_card_round_trip_refuses_mismatch_and_rebuilds(shards, encoder, tmp_path):
    root = ShardRoot(str(shards))
    enc_pt, card = load_encoder_and_card(str(encoder))
    enc_st, card_st = load_encoder_and_card(str(encoder.with_suffix(".safetensors")))
    assert card == card_st and card["modalities"] == ["s2rgbm"] and card["patch_size"] == 8 and card["grid"] == 32
    assert card["inputs"]["s2rgbm"]["bands"] == ["07_red", "07_green", "07_blue"]
    assert card["inputs"]["s2rgbm"]["units"] == ["reflectance"] * 3 and len(card["stats_hash"]) == 64
    for (k, a), b in zip(enc_pt.state_dict().items(), enc_st.state_dict().values()):
        assert torch.equal(a, b), k
    same = build_device_transforms(TRANSFORMS, root.modalities, root.stats, inputs=["s2rgbm"], targets=[],
                                   train=False)
    require_pipeline(card, same, root.stats)  # the training pipeline passes
    for wrong, what in (({"grid": {"size": 32}, "modalities": {"s2rgbm": {"bands": ["08_*"]}}}, "bands"),
                        ({**TRANSFORMS, "grid": {"size": 64}}, "grid"),
                        ({**TRANSFORMS, "kinds": {"optical": {"clip": [0.0, 0.3]}}}, "clip_hi"),
                        ({**TRANSFORMS, "stats_scope": "europe"}, "mean")):
        t = build_device_transforms(wrong, root.modalities, root.stats, inputs=["s2rgbm"], targets=[], train=False)
        with pytest.raises(PipelineMismatch, match=what):
            require_pipeline(card, t, root.stats)
    rebuilt = encoder_card.transforms_from_card(card, root.modalities)
    batch = {"s2rgbm": torch.randint(0, 255, (2, 3, 448, 448), dtype=torch.uint8),
             "bands": {"s2rgbm": ["07_red", "07_green", "07_blue"]}}
    torch.testing.assert_close(rebuilt(dict(batch), step=0)["s2rgbm"], same(dict(batch), step=0)["s2rgbm"])
    # embed refuses a config pipeline that does not match the card
    bad = cfg_for(shards, encoder, tmp_path / "bad", "transforms_from=config", "transforms.grid.size=64")
    with pytest.raises(PipelineMismatch, match="grid"):
        run(bad)


def test_pooling_leaves_absent_inputs_out():
    torch.manual_seed(0)
    enc = MultiModalEncoder({"a": 2, "b": 3}, **TINY).eval()
    x = {"a": torch.randn(3, 2, 16, 16), "b": torch.randn(3, 3, 16, 16)}
    full = embed_batch(enc, {**x, "a_present": torch.ones(3, dtype=torch.bool)}, "mean")
    with torch.no_grad():
        torch.testing.assert_close(full, enc(x).mean((2, 3)), atol=1e-5, rtol=1e-5)  # all present: forward's mean
    part = embed_batch(enc, {**x, "b_present": torch.tensor([True, False, True])}, "mean")
    only_a = embed_batch(enc, {"a": x["a"][1:2]}, "mean")  # a batch without b: a's tokens only
    torch.testing.assert_close(part[1:2], only_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part[[0, 2]], full[[0, 2]])
    assert embed_batch(enc, x, "modality_mean").shape == (3, 64)
    assert embed_batch(enc, x, "mean_max").shape == (3, 64)


@pytest.fixture(scope="module")
def shifted_shards(tmp_path_factory) -> Path:
    """Three regions from the same generator; china's S2 digital numbers are raised by 30 (a known shift)."""
    from shard_tools.build import BuildConfig, build
    from shard_tools.synth import SynthConfig, synth

    src = tmp_path_factory.mktemp("shifted-src")
    synth(SynthConfig(str(src), ("conus", "europe", "china"), 16, seed=9, modalities=("s2rgbm", "esawc"),
                      s2_offset={"china": 30.0}), progress=False)
    out = tmp_path_factory.mktemp("shifted-shards") / "root"
    build(BuildConfig(str(src), str(out), shard_size=80_000_000, workers=1, progress=False))
    return out


def test_a_shift_built_into_the_shards_is_found_through_an_encoder(shifted_shards, tmp_path):
    """Shards → (untrained, seeded) encoder → embeddings → shift analysis: the pair with china, whose S2 was
    shifted at generation, ranks first with an MMD² interval excluding zero; conus–europe (same generator, no
    shift) has an interval that includes it."""
    from m3leo_stream.shift import ShiftSettings, analyze, load_embeddings

    root = ShardRoot(str(shifted_shards))
    t = build_device_transforms(TRANSFORMS, root.modalities, root.stats, inputs=["s2rgbm"], targets=[], train=False)
    torch.manual_seed(0)
    enc = MultiModalEncoder({"s2rgbm": len(t.channels["s2rgbm"])}, **TINY)
    url = tmp_path / "encoder.pt"
    export_encoder(enc, str(url), t, root.stats, {"run_id": "test"})
    res = run(cfg_for(shifted_shards, url, tmp_path / "emb"))
    emb = load_embeddings(res["embeddings"])
    out = analyze(emb, ShiftSettings(n_boot=150, n_perm=50, seed=0, metrics=("mmd2",)), controls=("none",))
    rows = {tuple(sorted((r["region_a"], r["region_b"]))): r for r in out["pairs"] if r["metric"] == "mmd2"}
    top = min(rows.values(), key=lambda r: r["rank_mmd2"])
    assert "china" in (top["region_a"], top["region_b"])
    for pair in (("china", "conus"), ("china", "europe")):
        assert rows[pair]["ci_lo"] > 0 and rows[pair]["significant"], rows[pair]
    same = rows[("conus", "europe")]
    assert same["ci_lo"] <= 0 <= same["ci_hi"] and not same["significant"], same
