"""Streaming from a real S3 endpoint (moto_server on 127.0.0.1) through s3fs, with injected network faults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from m3leo_stream import shard_format as sf
from m3leo_stream.datamodule import M3LEODataModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from net_faults import FaultyProxy  # noqa: E402

pytestmark = pytest.mark.s3
INPUTS, TARGETS = ["modisveg"], ["esawc"]


def _keys(dm: M3LEODataModule, epoch: int = 0, on_batch=None) -> list[str]:
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(epoch)
    keys = []
    for i, b in enumerate(loader):
        keys += b["key"]
        if on_batch:
            on_batch(i)
    return keys


def test_s3_epoch_equals_local_epoch(s3_shards, uneven_shards):
    local = M3LEODataModule(str(uneven_shards), inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=0)
    remote = M3LEODataModule(s3_shards, inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=2)
    assert _keys(remote) == _keys(local)
    val = [k for b in remote.val_dataloader() for k, ok in zip(b["key"], b["valid"]) if ok]
    assert sorted(val) == sorted(k for b in local.val_dataloader() for k, ok in zip(b["key"], b["valid"]) if ok)


def test_s3_faults_are_retried_and_every_sample_arrives(s3, s3_shards, uneven_shards):
    proxy = FaultyProxy(s3.port, drop_every=3, stall_every=5, stall_s=3.0)
    try:
        opts = {"endpoint_url": proxy.url,
                "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}}
        dm = M3LEODataModule(s3_shards, inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=2,
                             storage_options=opts, retry={"base_delay": 0.05, "max_delay": 1.0, "deadline": 60})
        dm.setup()
        proxy.enabled = True

        def cut_once(i: int) -> None:
            if i == 3:
                proxy.outage(3.0)

        keys = _keys(dm, on_batch=cut_once)
        local = M3LEODataModule(str(uneven_shards), inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=0)
        assert keys == _keys(local)
        m = dm.loader_metrics()
        assert proxy.dropped + proxy.stalled + proxy.refused > 0
        assert m["retries"] > 0 and m["substitutions"] == 0
        print(f"proxy: {proxy.connections} connections, {proxy.dropped} dropped, {proxy.stalled} stalled, "
              f"{proxy.refused} refused; loader retries {m['retries']:.0f}")
    finally:
        proxy.close()


def test_s3_reads_only_the_selected_bands(s3_shards, uneven_shards):
    """Ranged GETs of the members' headers and selected bands only (biomass: agb_se of agb, agb_se), with the
    values of a local read of everything, and exactly those bytes."""
    import numpy as np
    import pyarrow.parquet as pq

    transforms = {"modalities": {"biomass": {"bands": ["agb_se"]}}}
    remote = M3LEODataModule(s3_shards, inputs=["biomass"], targets=TARGETS, batch_size=4, num_workers=2,
                             transforms=transforms, coalesce_gap=0)
    local = M3LEODataModule(str(uneven_shards), inputs=["biomass"], targets=TARGETS, batch_size=4, num_workers=0,
                            coalesce_gap=0)
    remote.setup()
    assert remote.bands == {"biomass": [1], "esawc": [0]}
    keys = []
    for a, b in zip(local.train_dataloader(), remote.train_dataloader(), strict=True):
        assert a["key"] == b["key"]
        keys += b["key"]
        assert b["biomass"].shape == (4, 1, 45, 45) and b["bands"]["biomass"] == ["agb_se"]
        assert np.array_equal(a["biomass"][:, 1:].numpy(), b["biomass"].numpy(), equal_nan=True)
        assert a["esawc"].numpy().tobytes() == b["esawc"].numpy().tobytes()
    index = pq.read_table(uneven_shards / "index.parquet").to_pydict()
    rows = [index["key"].index(k) for k in keys]
    band = 45 * 45 * 4
    digests = -sf.chunk_digests_range(0, 2)[0]  # biomass read in part: its chunk digests (and a tar header) too
    want = sum(index["biomass_nbytes"][r] - 2 * band + band + digests + index["esawc_nbytes"][r] for r in rows)
    assert remote.loader_metrics()["bytes"] == want
    assert local.loader_metrics()["bytes"] == want + len(rows) * (band - digests)


def _arrays(dm: M3LEODataModule) -> list[tuple[list[str], bytes]]:
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(0)
    return [(b["key"], b"".join(b[m].numpy().tobytes() for m in INPUTS + TARGETS)) for b in loader]


def test_s3_bytes_corrupted_in_transit_are_read_again(s3, s3_shards, uneven_shards):
    """One byte flipped in three ranged-GET bodies on the way (length unchanged): each is caught by its digest and
    read again, and the epoch's pixels are exactly those of a local read."""
    proxy = FaultyProxy(s3.port)
    try:
        dm = M3LEODataModule(s3_shards, inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=2,
                             storage_options={"endpoint_url": proxy.url})
        dm.setup()
        proxy.enabled = True
        proxy.corrupt(3)
        got = _arrays(dm)
        local = M3LEODataModule(str(uneven_shards), inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=0)
        assert got == _arrays(local)
        m = dm.loader_metrics()
        assert proxy.flipped == 3
        assert m["checksum_failures"] == 3 and m["retries"] >= 3 and m["substitutions"] == 0
    finally:
        proxy.close()


def test_s3_bytes_altered_at_rest_fail_at_once_naming_the_member(s3, uneven_shards, tmp_path):
    import shutil
    import time

    import pyarrow.parquet as pq
    import s3fs

    from m3leo_stream.reader import UnreadableSample

    root = tmp_path / "altered"
    shutil.copytree(uneven_shards, root)
    r = next(r for r in pq.read_table(root / "index.parquet").to_pylist() if r["split"] == "train")
    with open(root / r["shard"], "r+b") as f:
        f.seek(r["modisveg_offset"] + r["modisveg_nbytes"] - 10)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    bucket = s3.new_bucket()
    s3fs.S3FileSystem(endpoint_url=s3.url, key="testing", secret="testing").put(str(root), f"{bucket}/r",
                                                                                recursive=True)
    dm = M3LEODataModule(f"s3://{bucket}/r", inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=2,
                         retry={"deadline": 60})
    t = time.monotonic()
    with pytest.raises(UnreadableSample, match=rf"{r['shard']} key {r['key']} member modisveg: checksum mismatch"):
        _arrays(dm)
    assert time.monotonic() - t < 10
