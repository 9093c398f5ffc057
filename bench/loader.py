"""Loader throughput next to its ceiling and to the loaders people use today, in one run.

For the same shards (built from ``m3leo-shards synth`` data), the same samples, batch size and worker count:
  (a) ceiling   — plain ``pread`` of exactly the member byte ranges the loader reads, no decoding, in the loader's
                  two execution models: W threads of the consuming process, and W DataLoader worker processes;
  (b) m3leo     — ``M3LEODataModule.train_dataloader()``, default thread mode and ``worker_mode="process"``;
  (c) wds       — a plain webdataset pipeline over the same tar shards decoding the same ``.npy`` members;
  (d) upstream  — one rasterio open + read per chip per modality from the synth hub layout (the upstream way).
for s1grd alone, s1grd+esawc (2 of 9), s1grd+s2rgbm+esawc and all nine modalities. Then S3 on loopback
(moto_server): the loader against parallel ranged GETs of the same bytes; the time to the first batch for an index of
1M samples in 10k shards; and the readers' RSS over eight epochs (worker processes, or the training process in thread
mode), each in a fresh process. Repeats alternate the methods; medians are reported. All data is in the page cache
(the ceiling is memory bandwidth + syscalls); ratios are what this machine can tell.

Band selection: bytes read per sample when the loader reads every band of the inputs (``transforms=None``, as
before) and when it reads only the bands the experiment's device transforms use, for the ``demo`` and
``pretrain_mae`` experiments (their Hydra configs composed as ``train.py`` does). ``--bands-only`` runs just that
(results in ``bench/results/loader_bands.json``).

Checksums: throughput with every member verified against its digest (the default) and with verification off, side
by side (``checksum_cost``; in the full run too). ``--checksums-only`` runs just that
(``bench/results/loader_checksums.json``):

    python bench/loader.py --chips-per-region 16 --workers 2 --repeats 3
    python bench/loader.py --bands-only --chips-per-region 4 --workers 2
    python bench/loader.py --checksums-only --chips-per-region 16 --workers 2 --repeats 5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m3leo_stream import shard_format as sf  # noqa: E402
from m3leo_stream.datamodule import M3LEODataModule  # noqa: E402
from m3leo_stream.modalities import REGISTRY  # noqa: E402
from m3leo_stream.reader import passthrough  # noqa: E402
from shard_tools.build import BuildConfig, build  # noqa: E402
from shard_tools.synth import SynthConfig, synth  # noqa: E402

ALL = list(REGISTRY)
SETS = {"s1grd": ["s1grd"], "s1grd+esawc (2 of 9)": ["s1grd", "esawc"],
        "s1grd+s2rgbm+esawc": ["s1grd", "s2rgbm", "esawc"], "all9": ALL}


# -- (a) ceiling -----------------------------------------------------------------------------------------------
def pread_range(path: str, off: int, n: int) -> bytes:
    """A plain read of one byte range (open, pread, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def get_ranges(fs, rs: list[tuple[str, int, int]]) -> list[bytes]:
    """Parallel ranged GETs of ``rs`` (s3fs ``cat_ranges``, all at once)."""
    return fs.cat_ranges([p for p, _, _ in rs], [o for _, o, _ in rs], [o + n for _, o, n in rs])


class RangeReads(torch.utils.data.Dataset):
    """pread of given (shard path, offset, nbytes) ranges, handed to the consumer as uint8 tensors (``deliver``)
    or only counted (nothing leaves the worker: an upper bound no loader can reach)."""

    def __init__(self, ranges: list[list[tuple[str, int, int]]], deliver: bool = True):
        self.ranges = ranges
        self.deliver = deliver

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int):
        out = []
        for r in self.ranges[i]:
            data = pread_range(*r)
            out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.deliver else len(data))
        return out


class ThreadedRangeReads:
    """The thread-mode ceiling: ``workers`` threads of this process read batch after batch of ranges (one batch per
    task, into fresh buffers), handed over in order."""

    def __init__(self, ranges: list[list[tuple[str, int, int]]], batch: int, workers: int, read=None):
        self.batches = [ranges[i:i + batch] for i in range(0, len(ranges), batch)]
        self.pool = ThreadPoolExecutor(workers)
        self.read = read or self._read

    @staticmethod
    def _read(samples: list[list[tuple[str, int, int]]]) -> list[list[bytes]]:
        return [[pread_range(*r) for r in sample] for sample in samples]

    def __iter__(self):
        return self.pool.map(self.read, self.batches)


def _count_bytes(batch) -> tuple[int, int]:
    return len(batch), sum(len(x) for s in batch for x in s)


def _count_ranges(batch) -> tuple[int, int]:
    return len(batch), sum(int(x.numel()) if isinstance(x, torch.Tensor) else int(x) for s in batch for x in s)


# -- (d) upstream ----------------------------------------------------------------------------------------------
class UpstreamTiffs(torch.utils.data.Dataset):
    """One rasterio open + full read per chip per modality (GeoTIFFs only; NetCDF modalities are skipped)."""

    def __init__(self, paths: list[dict[str, str]]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import rasterio

        out = {}
        for name, path in self.paths[i].items():
            with rasterio.open(path) as ds:
                out[name] = torch.from_numpy(ds.read())
        return out


def _collate_list(batch):
    return batch


PASSES = 3
RSS_EPOCHS = 8
METHODS = ("pread_only", "ceiling_workers", "ceiling_threads", "m3leo", "m3leo_process", "wds", "upstream")


def _drain(loader, count_bytes, before_pass=None) -> tuple[int, int, float]:
    """One untimed warm-up pass (worker start-up), then ``PASSES`` timed passes."""
    n = nbytes = 0
    t = 0.0
    for p in range(PASSES + 1):
        if before_pass:
            before_pass(p)
        if p == 1:
            t = time.perf_counter()
        for b in loader:
            if p:
                k, nb = count_bytes(b)
                n += k
                nbytes += nb
    return n, nbytes, time.perf_counter() - t


def member_ranges(root: str, batches: list[list[int]], index: dict,
                  mods: list[str]) -> list[list[tuple[str, int, int]]]:
    """Per sample of the planned batches: (shard path under ``root``, offset, nbytes) of each requested member."""
    return [[(f"{root}/{index['shard'][r]}", index[sf.offset_column(m)][r], index[sf.nbytes_column(m)][r])
             for m in mods] for b in batches for r in b]


def run_ceiling(root: Path, batches: list[list[int]], index: dict, mods: list[str], workers: int,
                deliver: bool = True):
    ranges = member_ranges(str(root), batches, index, mods)
    bs = len(batches[0])
    dl = torch.utils.data.DataLoader(RangeReads(ranges, deliver), batch_size=bs, num_workers=workers,
                                     collate_fn=_collate_list, persistent_workers=workers > 0)
    return _drain(dl, _count_ranges)


def run_thread_ceiling(root: Path, batches: list[list[int]], index: dict, mods: list[str], workers: int):
    ranges = member_ranges(str(root), batches, index, mods)
    return _drain(ThreadedRangeReads(ranges, len(batches[0]), workers), _count_bytes)


def run_loader(root: str, mods: list[str], workers: int, batch: int, epoch: int, **kw):
    dm = M3LEODataModule(root, inputs=mods, batch_size=batch, num_workers=workers, seed=0, **kw)
    dm.setup()
    loader = dm.train_dataloader()
    marks = {}

    def before(p: int) -> None:
        # consecutive epochs, as in training: the same samples in another order each pass (the thread mode reads
        # the next epoch's first batches ahead)
        loader.batch_sampler.set_epoch(epoch + p)
        marks[p] = dm.loader_metrics()["bytes"]

    n, _, s = _drain(loader, lambda b: (len(b["key"]), 0), before)
    return n, int(dm.loader_metrics()["bytes"] - marks[1]), s


def run_wds(root: Path, mods: list[str], workers: int, batch: int):
    import webdataset as wds

    urls = sorted(str(p) for p in (root).glob("*/train/*.tar"))
    keys = [f"{m}.npy" for m in mods]
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
          .select(lambda sample: all(k in sample for k in keys)).decode(only=keys).to_tuple(*keys)
          .batched(batch, collation_fn=_collate_list))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    nbytes = PASSES * sum(os.path.getsize(u) for u in urls)
    n, _, s = _drain(dl, lambda b: (len(b), 0))
    return n, nbytes, s


def run_upstream(src: Path, keys: list[str], mods: list[str], workers: int, batch: int):
    tif = [m for m in mods if REGISTRY[m].file_ext == "tif"]
    files = {}
    for p in glob.glob(str(src / "*" / "*" / "*" / "*.tif")):
        folder, name = Path(p).parent.name, Path(p).stem
        m = REGISTRY.for_folder(folder)
        if m is not None and m.name in tif:
            files.setdefault(name, {})[m.name] = p
    paths = [files[k] for k in keys if k in files and len(files[k]) == len(tif)]
    dl = torch.utils.data.DataLoader(UpstreamTiffs(paths), batch_size=batch, num_workers=workers,
                                     collate_fn=_collate_list, persistent_workers=workers > 0)
    nbytes = PASSES * sum(os.path.getsize(p) for d in paths for p in d.values())
    n, _, s = _drain(dl, lambda b: (len(b), 0))
    return n, nbytes, s


def median_rate(results: list[tuple[int, int, float]]) -> dict[str, float]:
    return {"samples_per_s": statistics.median(n / s for n, _, s in results),
            "MB_per_s": statistics.median(b / s / 1e6 for _, b, s in results), "samples": results[0][0]}


# -- S3 --------------------------------------------------------------------------------------------------------
def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    return proc, f"http://127.0.0.1:{port}"


class S3RangeReads(torch.utils.data.Dataset):
    """Parallel ranged GETs (s3fs ``cat_ranges``, all ranges of a batch at once) of given ranges."""

    def __init__(self, ranges: list[list[tuple[str, int, int]]]):
        self.ranges = ranges
        self._fs = None

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitems__(self, idx: list[int]) -> int:
        import s3fs

        if self._fs is None:
            self._fs = s3fs.S3FileSystem(skip_instance_cache=True)
        return sum(len(d) for d in get_ranges(self._fs, [r for i in idx for r in self.ranges[i]]))


def run_s3_ceiling(url: str, batches, index, mods, workers):
    prefix = url.split("://", 1)[1]
    ranges = member_ranges(prefix, batches, index, mods)
    bs = len(batches[0])
    dl = torch.utils.data.DataLoader(S3RangeReads(ranges), batch_size=bs, num_workers=workers,
                                     collate_fn=passthrough, persistent_workers=workers > 0)
    return _drain(dl, lambda nbytes: (bs, nbytes))


def run_s3_thread_ceiling(url: str, batches, index, mods, workers):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    ranges = member_ranges(url.split("://", 1)[1], batches, index, mods)
    bs = len(batches[0])

    def read(samples: list[list[tuple[str, int, int]]]) -> list[list[bytes]]:
        return [get_ranges(fs, [r for s in samples for r in s])]

    reads = ThreadedRangeReads(ranges, bs, workers, read)
    return _drain(reads, lambda b: (bs, sum(len(x) for x in b[0])))


# -- 1M-sample index -------------------------------------------------------------------------------------------
def big_index(root: Path, out: Path, n: int, shards: int) -> None:
    """A shard root whose index has ``n`` samples in ``shards`` shards: every shard is a hard link to one real
    shard and the rows reuse that shard's member ranges (the planner and reader cannot tell)."""
    t = pq.read_table(root / "index.parquet")
    d = t.to_pydict()
    first = d["shard"][0]
    rows = [i for i, s in enumerate(d["shard"]) if s == first]
    out.mkdir(parents=True)
    for name in (sf.MANIFEST, sf.STATS):
        shutil.copy(root / name, out / name)
    (out / "s").mkdir()
    for j in range(shards):
        os.link(root / first, out / "s" / f"{j:05d}.tar")
    per = n // shards
    pick = np.array(rows)[np.arange(n) % len(rows)]
    cols = {}
    for c in t.column_names:
        arr = t.column(c).to_numpy(zero_copy_only=False)
        cols[c] = arr[pick]
    cols["key"] = np.array([f"k{i:07d}" for i in range(n)])
    cols["shard"] = np.array([f"s/{j:05d}.tar" for j in np.arange(n) // per])
    splits = np.array(["train", "val", "test"])
    cols["split"] = splits[(np.arange(n) % 10 >= 8).astype(int) + (np.arange(n) % 10 >= 9).astype(int)]
    pq.write_table(pa.table({c: cols[c] for c in t.column_names}), out / "index.parquet")


def time_to_first_batch(root: Path, mods: list[str], workers: int, batch: int) -> float:
    t = time.perf_counter()
    dm = M3LEODataModule(str(root), inputs=mods, batch_size=batch, num_workers=workers, persistent_workers=False)
    dm.setup()
    next(iter(dm.train_dataloader()))
    return time.perf_counter() - t


def reader_rss(root: str, mods: list[str], workers: int, batch: int, epochs: int, mode: str) -> list[int]:
    """RSS of whatever holds the readers after each epoch: the worker processes, or this process."""
    dm = M3LEODataModule(root, inputs=mods, batch_size=batch, num_workers=workers, worker_mode=mode)
    dm.setup()
    loader = dm.train_dataloader()
    out = []
    for e in range(epochs):
        loader.batch_sampler.set_epoch(e)
        for _ in loader:
            pass
        pids = [w.pid for w in loader._iterator._workers] if mode == "process" else [os.getpid()]
        total = 0
        for pid in pids:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        out.append(total)
    return out


# -- band selection --------------------------------------------------------------------------------------------
BAND_EXPERIMENTS = ("demo", "pretrain_mae")


def experiment_data(name: str) -> tuple[list[str], list[str], dict]:
    """(inputs, targets, transforms config) of ``m3leo_stream/configs/experiment/<name>.yaml``, composed as
    ``train.py`` does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from m3leo_stream.config import register
    from m3leo_stream.configs import CONFIG_DIR

    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"])
    return (list(cfg.data.inputs), list(cfg.data.get("targets") or []),
            OmegaConf.to_container(cfg.transforms, resolve=True))


def bytes_per_sample(root: str, inputs: list[str], targets: list[str], transforms, workers: int, batch: int,
                     epochs: int) -> dict[str, float]:
    """Bytes and requests the loader made per sample over ``epochs`` train epochs (thread mode) after a warm-up
    epoch, and the samples/s of those epochs (page-cached shards: what reading fewer bytes saves in copying)."""
    dm = M3LEODataModule(root, inputs=inputs, targets=targets, batch_size=batch, num_workers=workers, seed=0,
                         transforms=transforms)
    dm.setup()
    loader = dm.train_dataloader()
    for e in range(epochs + 1):
        if e == 1:
            start, t = dm.loader_metrics(), time.perf_counter()
        loader.batch_sampler.set_epoch(e)
        for _ in loader:
            pass
    seconds = time.perf_counter() - t
    m = {k: v - start[k] for k, v in dm.loader_metrics().items() if k in ("bytes", "requests", "samples")}
    return {"bytes_per_sample": m["bytes"] / m["samples"], "requests_per_sample": m["requests"] / m["samples"],
            "samples_per_s": m["samples"] / seconds, "samples": m["samples"]}


def band_selection(root: str, workers: int, batch: int, epochs: int, repeats: int) -> dict:
    """Per experiment: bytes per sample reading all bands vs only the transforms' bands, and the ratio (repeats
    alternate the two; medians)."""
    from m3leo_stream.transforms import bands_needed

    out = {}
    for name in BAND_EXPERIMENTS:
        inputs, targets, transforms = experiment_data(name)
        mods = [REGISTRY[m] for m in inputs + targets]
        sel = bands_needed(transforms, REGISTRY, inputs=inputs, targets=targets)
        runs: dict[str, list[dict[str, float]]] = {"all": [], "selected": []}
        for _ in range(max(1, repeats)):
            runs["all"].append(bytes_per_sample(root, inputs, targets, None, workers, batch, epochs))
            runs["selected"].append(bytes_per_sample(root, inputs, targets, transforms, workers, batch, epochs))
        before, after = ({k: statistics.median(r[k] for r in v) for k in v[0]} for v in runs.values())
        selected = sum(m.nbytes * len(sel[m.name]) // len(m.bands) for m in mods)  # array bytes, no headers
        row = {"inputs": inputs, "targets": targets,
               "bands": {m.name: f"{len(sel[m.name])} of {len(m.bands)}" for m in mods},
               "all_bands": before, "selected_bands": after,
               "ratio": after["bytes_per_sample"] / before["bytes_per_sample"],
               "array_bytes_per_sample": {"all_bands": sum(m.nbytes for m in mods), "selected_bands": selected}}
        out[name] = row
        print(f"\nband selection, {name} ({'+'.join(inputs + targets)}; "
              + ", ".join(f"{k} {v}" for k, v in row["bands"].items()) + "):")
        for label, r in (("all bands", before), ("selected bands", after)):
            print(f"  {label:15s} {r['bytes_per_sample'] / 1e6:8.3f} MB/sample {r['requests_per_sample']:5.2f} "
                  f"requests/sample {r['samples_per_s']:7.1f} samples/s")
        print(f"  ratio           {row['ratio']:8.3f}")
    return out


def hash_floor(root: str, mods: list[str], repeats: int) -> dict[str, float]:
    """What any reader that hashes every byte it reads pays on page-cached shards: CPU time of ``preadv``-ing the
    train members of ``mods`` into a buffer, with and without XXH3-64 of the buffer after (one thread)."""
    import xxhash

    t = pq.read_table(Path(root) / sf.INDEX).to_pydict()
    ranges = [(str(Path(root) / t["shard"][i]), t[sf.offset_column(m)][i], t[sf.nbytes_column(m)][i])
              for i in range(len(t["key"])) if t["split"][i] == "train" for m in mods
              if t[sf.offset_column(m)][i] is not None]
    buf = memoryview(bytearray(max(n for _, _, n in ranges)))
    fds = {p: os.open(p, os.O_RDONLY) for p in {p for p, _, _ in ranges}}
    times: dict[str, list[float]] = {"preadv": [], "preadv+xxh3": []}
    try:
        for _ in range(max(3, repeats)):
            for label in times:
                c = time.thread_time()
                for p, off, n in ranges:
                    os.preadv(fds[p], [buf[:n]], off)
                    if label != "preadv":
                        xxhash.xxh3_64_intdigest(buf[:n])
                times[label].append(time.thread_time() - c)
    finally:
        for fd in fds.values():
            os.close(fd)
    nbytes = sum(n for _, _, n in ranges)
    rate = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    return {"preadv_GB_per_cpu_s": rate["preadv"], "preadv_xxh3_GB_per_cpu_s": rate["preadv+xxh3"],
            "cost": 1 - rate["preadv+xxh3"] / rate["preadv"]}


def checksum_cost(root: str, workers: int, batch: int, repeats: int) -> dict:
    """Loader throughput with member checksums verified (the default) and off, side by side: per modality set, in
    thread and process mode, and reading only the bands of the ``pretrain_mae`` experiment's transforms (per-band
    digests). Repeats alternate on and off; medians; ``cost`` = 1 - verified / unverified."""
    inputs, targets, transforms = experiment_data("pretrain_mae")
    cases = {f"{label}, {mode}": ({"mods": mods, "worker_mode": mode}) for label, mods in SETS.items()
             for mode in ("thread", "process") if label != "all9" or mode == "thread"}
    cases["pretrain_mae bands, thread"] = {"mods": inputs + targets, "worker_mode": "thread",
                                           "transforms": transforms}
    out: dict = {"floor": {label: hash_floor(root, mods, repeats) for label, mods in SETS.items()}}
    print("\nthe floor: CPU time of preadv of page-cached members, with XXH3-64 of each after (one thread):")
    for label, f in out["floor"].items():
        print(f"  {label:22s} preadv {f['preadv_GB_per_cpu_s']:6.2f} GB/cpu-s, "
              f"+xxh3 {f['preadv_xxh3_GB_per_cpu_s']:6.2f} GB/cpu-s: cost {100 * f['cost']:+5.1f} %")
    print(f"\nchecksum cost ({workers} workers, batch {batch}, medians of {repeats}):")
    for label, case in cases.items():
        kw = {k: v for k, v in case.items() if k != "mods"}
        runs: dict[str, list] = {"verified": [], "unverified": []}
        cpu: dict[str, list[float]] = {"verified": [], "unverified": []}
        for _ in range(max(1, repeats)):
            for name, verify in (("verified", True), ("unverified", False)):
                c = time.process_time()
                runs[name].append(run_loader(root, case["mods"], workers, batch, 0, verify_checksums=verify, **kw))
                cpu[name].append((time.process_time() - c) / runs[name][-1][0])
        row = {k: median_rate(v) for k, v in runs.items()}
        row["cost"] = 1 - row["verified"]["samples_per_s"] / row["unverified"]["samples_per_s"]
        if case["worker_mode"] == "thread":  # the reading threads' CPU is this process's: a figure load cannot skew
            row["cpu_ms_per_sample"] = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
            row["cpu_cost"] = row["cpu_ms_per_sample"]["verified"] / row["cpu_ms_per_sample"]["unverified"] - 1
        out[label] = row
        cpu_note = f"  CPU/sample {100 * row['cpu_cost']:+5.1f} %" if "cpu_cost" in row else ""
        print(f"  {label:34s} verified {row['verified']['samples_per_s']:8.1f}  unverified "
              f"{row['unverified']['samples_per_s']:8.1f} samples/s  ({row['verified']['MB_per_s']:7.0f} MB/s)  "
              f"cost {100 * row['cost']:+5.1f} %{cpu_note}")
    return out


def s3_checksum_cost(shards: Path, workers: int, batch: int, repeats: int) -> dict:
    """Verified against unverified over S3 (moto on loopback), s1grd+s2rgbm+esawc, thread mode."""
    import s3fs

    proc, _ = start_moto()
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(shards), "bench/shards", recursive=True)
        mods = SETS["s1grd+s2rgbm+esawc"]
        runs: dict[str, list] = {"verified": [], "unverified": []}
        for _ in range(max(1, repeats)):
            for name, verify in (("verified", True), ("unverified", False)):
                runs[name].append(run_loader("s3://bench/shards", mods, workers, batch, 0, verify_checksums=verify))
    finally:
        proc.terminate()
    row = {k: median_rate(v) for k, v in runs.items()}
    row["cost"] = 1 - row["verified"]["samples_per_s"] / row["unverified"]["samples_per_s"]
    print(f"  {'S3 (moto), ' + '+'.join(mods):34s} verified {row['verified']['samples_per_s']:8.1f}  unverified "
          f"{row['unverified']['samples_per_s']:8.1f} samples/s  ({row['verified']['MB_per_s']:7.0f} MB/s)  "
          f"cost {100 * row['cost']:+5.1f} %")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips-per-region", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=10, help="timed passes (epochs) per measurement after a warm-up")
    ap.add_argument("--work", default=None, help="keep generated data here (default: a temporary directory)")
    ap.add_argument("--big-index", type=int, default=1_000_000)
    ap.add_argument("--big-shards", type=int, default=10_000)
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--s3-passes", type=int, default=3, help="timed passes per S3 measurement (moto is slow)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "loader.json"))
    ap.add_argument("--bands-only", action="store_true",
                    help="only the band-selection section (bytes per sample, all bands vs the transforms' bands)")
    ap.add_argument("--band-epochs", type=int, default=5, help="timed train epochs per band-selection measurement")
    ap.add_argument("--checksums-only", action="store_true",
                    help="only the checksum section (throughput with member checksums verified and off)")
    ap.add_argument("--rss-of", choices=("thread", "process"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bands_only and args.out == ap.get_default("out"):
        args.out = str(Path(__file__).with_name("results") / "loader_bands.json")
    if args.checksums_only and args.out == ap.get_default("out"):
        args.out = str(Path(__file__).with_name("results") / "loader_checksums.json")
    global PASSES
    PASSES = args.passes
    if args.rss_of:
        rss = reader_rss(str(Path(args.work) / "shards"), ["s1grd", "s2rgbm", "esawc"], args.workers,
                         args.batch_size, RSS_EPOCHS, args.rss_of)
        print(json.dumps(rss))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="m3leo-bench-loader-"))
    src, shards = work / "src", work / "shards"
    if not (shards / sf.MANIFEST).exists():
        synth(SynthConfig(str(src), regions=("conus", "europe"), chips_per_region=args.chips_per_region, seed=0),
              workers=args.workers, progress=False)
        build(BuildConfig(str(src), str(shards), shard_size=200_000_000, workers=args.workers, progress=False))
    index = pq.read_table(shards / "index.parquet").to_pydict()
    W, B = args.workers, args.batch_size
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "CPU"},
                     "workers": W, "batch_size": B, "sets": {}}
    if args.checksums_only or args.bands_only:  # one section only
        results.pop("sets")
        results["chips_per_region"], results["passes"] = args.chips_per_region, PASSES
        if args.checksums_only:
            results["checksums"] = checksum_cost(str(shards), W, B, args.repeats)
            if not args.skip_s3:
                PASSES = args.s3_passes
                results["checksums"]["s3"] = s3_checksum_cost(shards, W, B, args.repeats)
        else:
            results["band_selection"] = band_selection(str(shards), W, B, args.band_epochs, args.repeats)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")
        if not args.work:
            shutil.rmtree(work)
        return
    results["band_selection"] = band_selection(str(shards), W, B, args.band_epochs, args.repeats)

    for label, mods in SETS.items():
        dm = M3LEODataModule(str(shards), inputs=mods, batch_size=B, num_workers=0)
        dm.setup()
        sampler = dm.train_dataloader().batch_sampler
        batches = list(sampler)
        keys = [index["key"][r] for b in batches for r in b]
        runs: dict[str, list] = {k: [] for k in METHODS}
        for rep in range(args.repeats):
            runs["pread_only"].append(run_ceiling(shards, batches, index, mods, W, deliver=False))
            runs["ceiling_workers"].append(run_ceiling(shards, batches, index, mods, W))
            runs["ceiling_threads"].append(run_thread_ceiling(shards, batches, index, mods, W))
            runs["m3leo"].append(run_loader(str(shards), mods, W, B, 0))
            runs["m3leo_process"].append(run_loader(str(shards), mods, W, B, 0, worker_mode="process"))
            runs["wds"].append(run_wds(shards, mods, W, B))
            if label != "all9" or rep == 0:
                runs["upstream"].append(run_upstream(src, keys, mods, W, B))
        row = {k: median_rate(v) for k, v in runs.items()}
        rate = {k: v["samples_per_s"] for k, v in row.items()}
        row["ratios"] = {
            "m3leo/ceiling_threads": rate["m3leo"] / rate["ceiling_threads"],
            "m3leo_process/ceiling_workers": rate["m3leo_process"] / rate["ceiling_workers"],
            "m3leo/wds": rate["m3leo"] / rate["wds"], "m3leo/upstream": rate["m3leo"] / rate["upstream"],
            "m3leo_process/wds": rate["m3leo_process"] / rate["wds"],
            "m3leo_process/upstream": rate["m3leo_process"] / rate["upstream"],
        }
        results["sets"][label] = row
        print(f"\n{label}: {len(keys)} samples, {W} workers, batch {B}")
        for k in METHODS:
            print(f"  {k:16s} {row[k]['samples_per_s']:9.1f} samples/s {row[k]['MB_per_s']:9.1f} MB/s")
        print("  " + "  ".join(f"{k} = {v:.2f}" for k, v in row["ratios"].items()))

    results["checksums"] = checksum_cost(str(shards), W, B, args.repeats)

    if not args.skip_s3:
        import s3fs

        proc, endpoint = start_moto()
        try:
            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            fs.put(str(shards), "bench/shards", recursive=True)
            url = "s3://bench/shards"
            mods = ["s1grd", "s2rgbm", "esawc"]
            dm = M3LEODataModule(url, inputs=mods, batch_size=B, num_workers=0)
            dm.setup()
            batches = list(dm.train_dataloader().batch_sampler)
            PASSES = args.s3_passes
            s3_methods = ("ranged_gets_workers", "ranged_gets_threads", "m3leo", "m3leo_process")
            runs = {k: [] for k in s3_methods}
            for _ in range(args.repeats):
                runs["ranged_gets_workers"].append(run_s3_ceiling(url, batches, index, mods, W))
                runs["ranged_gets_threads"].append(run_s3_thread_ceiling(url, batches, index, mods, W))
                runs["m3leo"].append(run_loader(url, mods, W, B, 0))
                runs["m3leo_process"].append(run_loader(url, mods, W, B, 0, worker_mode="process"))
            row = {k: median_rate(v) for k, v in runs.items()}
            rate = {k: v["samples_per_s"] for k, v in row.items()}
            best = max(rate["ranged_gets_workers"], rate["ranged_gets_threads"])
            row["ratios"] = {"m3leo/best_ranged_gets": rate["m3leo"] / best,
                             "m3leo_process/best_ranged_gets": rate["m3leo_process"] / best}
            results["s3"] = {"endpoint": "moto_server on 127.0.0.1", "modalities": mods, **row}
            print(f"\nS3 (moto on loopback), {'+'.join(mods)}:")
            for k in s3_methods:
                print(f"  {k:19s} {row[k]['samples_per_s']:9.1f} samples/s {row[k]['MB_per_s']:9.1f} MB/s")
            print("  " + "  ".join(f"{k} = {v:.2f}" for k, v in row["ratios"].items()))
        finally:
            proc.terminate()

    big = work / "big"
    if big.exists():
        shutil.rmtree(big)
    big_index(shards, big, args.big_index, args.big_shards)
    ttfb = time_to_first_batch(big, ["s1grd"], W, B)
    results["time_to_first_batch"] = {"samples": args.big_index, "shards": args.big_shards, "seconds": ttfb}
    print(f"\ntime to first batch, index of {args.big_index} samples in {args.big_shards} shards: {ttfb:.2f} s")
    shutil.rmtree(big)

    for mode in ("thread", "process"):  # in a fresh process each: nothing else of this run in the figure
        out = subprocess.run([sys.executable, __file__, "--rss-of", mode, "--work", str(work), "--workers", str(W),
                              "--batch-size", str(B)], check=True, capture_output=True, text=True).stdout
        rss = json.loads(out.strip().splitlines()[-1])
        results.setdefault("reader_rss_bytes_per_epoch", {})[mode] = rss
        where = "the training process (reader threads)" if mode == "thread" else "the worker processes"
        print(f"RSS of {where} after epochs 1-{len(rss)} (MB): " + ", ".join(f"{r / 1e6:.0f}" for r in rss))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
