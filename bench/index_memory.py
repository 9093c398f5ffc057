"""Index memory and setup time at the release's scale, per node: ranks that share one node-local index file.

For shard roots of N samples in 60k shards (manifest and ``index.parquet`` with the real columns, no pixels: the
shards are never opened), ``--ranks`` processes start at once with one ``cache_dir``, as the ranks of one node do;
each runs ``M3LEODataModule.setup("fit")`` and, as rank 7 of 64, its training loader (the catalogue and the
first two epochs' plans) and reports:
  - setup seconds (the first rank converts the index; the others wait for it, then map it),
  - its anonymous memory growth over setup + planning (RSS growth minus the index files it maps),
  - the resident bytes of the mapped index files (the page cache holds them once for the node).
The node total is the ranks' anonymous growth plus the mapped files once. Beside it, one rank holding the same
arrays in memory (``IndexArrays.from_table``, the fall-back when no local directory can be written). Printed side by
side for each N; results in ``bench/results/index_memory.json``::

    python bench/index_memory.py --samples 1000000 4000000 17000000 --ranks 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m3leo_stream import shard_format as sf  # noqa: E402
from m3leo_stream.modalities import REGISTRY  # noqa: E402

MODS = ["s1grd", "s2rgbm", "esawc"]
REGIONS = ["asia", "china", "conus", "europe", "pakin", "sam"]
SHARD_BYTES = 1 << 30


def make_root(out: Path, n: int, shards: int, mods: list[str]) -> None:
    """A format-version-2 root of ``n`` samples in ``shards`` shards: manifest and index only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shard_tools.downsample import entry_json

    out.mkdir(parents=True)
    per = -(-n // shards)
    names = [sf.shard_name(REGIONS[j % len(REGIONS)], "train", j) for j in range(shards)]
    manifest = {"format_version": sf.FORMAT_VERSION, "checksum": sf.CHECKSUM, "created": "bench", "regions": REGIONS,
                "num_samples": n, "compression": "none", "modalities": {m: entry_json(REGISTRY[m], {}) for m in mods},
                "shards": [{"path": p, "bytes": SHARD_BYTES, "num_samples": per} for p in names]}
    (out / sf.MANIFEST).write_text(json.dumps(manifest))
    (out / sf.STATS).write_text("{}")
    schema = sf.index_schema({m: len(REGISTRY[m].bands) for m in mods}, compressed=False)
    hexdigits = np.frombuffer(b"0123456789abcdef", dtype="S1")
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(out / sf.INDEX, schema, compression="zstd") as w:
        for start in range(0, n, 1 << 20):
            i = np.arange(start, min(n, start + (1 << 20)), dtype=np.int64)
            k = i * 2654435761 % (1 << 52)  # distinct 13-hex keys
            key = hexdigits[(k[:, None] >> (4 * np.arange(12, -1, -1))) & 15].view("S13").ravel()
            shard = i // per
            cols = {"key": pa.array(key.astype(str)), "region": pa.array(np.array(REGIONS)[shard % len(REGIONS)]),
                    "split": pa.array(np.where(i % 10 < 8, "train", np.where(i % 10 < 9, "val", "test"))),
                    "shard": pa.array(np.array(names)[shard]), "lon": pa.array(rng.uniform(-180, 180, len(i))),
                    "lat": pa.array(rng.uniform(-60, 60, len(i)))}
            slot = i % per
            for j, member in enumerate([sf.JSON_MEMBER, *mods]):
                size = 2048 if member == sf.JSON_MEMBER else REGISTRY[member].nbytes + 128
                cols[sf.offset_column(member)] = pa.array(slot * (SHARD_BYTES // per) + 512 + j * size)
                cols[sf.nbytes_column(member)] = pa.array(np.full(len(i), size))
                cols[sf.checksum_column(member)] = pa.array(rng.integers(0, 2**63, len(i), dtype=np.uint64))
                if member != sf.JSON_MEMBER:
                    cols[sf.chunks_checksum_column(member)] = pa.array(rng.integers(0, 2**63, len(i), dtype=np.uint64))
            w.write_table(pa.table(cols, schema=schema), row_group_size=65536)


def _mapped_bytes(under: str) -> int:
    """Resident bytes of this process's mappings of files under ``under``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = len(head) >= 6 and head[5].startswith(under)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def rank(root: str, cache_dir: str, in_memory: bool) -> dict:
    """One rank: setup + the first epoch's plan (world size 64); what it took."""
    import pyarrow.parquet  # noqa: F401 - as in training: imported before
    import torch  # noqa: F401

    from m3leo_stream.datamodule import M3LEODataModule

    rss0 = _rss()
    t = time.perf_counter()
    if in_memory:  # a cache_dir that cannot be written: the DataModule's own fall-back holds the arrays in memory
        cache_dir = os.path.join(cache_dir, "not-a-directory")
        Path(cache_dir).write_text("")
    dm = M3LEODataModule(root, inputs=MODS[:-1], targets=MODS[-1:], batch_size=8, num_workers=0,
                         cache_dir=cache_dir)
    dm.setup("fit")
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    dm.trainer = SimpleNamespace(global_rank=7, world_size=64, current_epoch=0,  # as rank 7 of 64 sees it
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    sampler = dm.train_dataloader().batch_sampler
    sampler.plan_for(1)  # the next epoch's plan, made in the background, is held too
    plan_s = time.perf_counter() - t
    mapped = _mapped_bytes(cache_dir)
    return {"setup_s": setup_s, "plan_s": plan_s, "anon_growth": _rss() - rss0 - mapped, "mapped": mapped,
            "index_bytes": dm._index.nbytes_held}


def measure(root: Path, ranks: int) -> dict:
    cache = tempfile.mkdtemp(prefix="m3leo-bench-index-")
    try:
        cmd = [sys.executable, __file__, "--rank-of", str(root), "--cache-dir", cache]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(ranks)]
        per_rank = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        alone = json.loads(subprocess.run(cmd + ["--in-memory"], check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    node = sum(r["anon_growth"] for r in per_rank) + max(r["mapped"] for r in per_rank)
    return {"ranks": per_rank, "node_bytes": node, "in_memory_rank": alone,
            "setup_s": {"first": max(r["setup_s"] for r in per_rank), "median": float(np.median(
                [r["setup_s"] for r in per_rank]))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[1_000_000, 4_000_000, 17_000_000])
    ap.add_argument("--shards", type=int, default=60_000)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--work", default=None, help="keep generated roots here (default: a temporary directory)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "index_memory.json"))
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_of:
        print(json.dumps(rank(args.rank_of, args.cache_dir, args.in_memory)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="m3leo-bench-index-roots-"))
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "modalities": MODS,
               "shards": args.shards, "ranks_per_node": args.ranks, "runs": {}}
    print(f"{args.ranks} ranks per node, {'+'.join(MODS)}, {args.shards} shards; MB")
    print(f"{'samples':>10} {'setup s (first/median)':>24} {'plan s':>7} {'index arrays':>13} {'node total':>11} "
          f"{'per rank':>9} {'in memory, one rank':>20}")
    for n in args.samples:
        root = work / f"root-{n}"
        if not (root / sf.MANIFEST).exists():
            t = time.perf_counter()
            make_root(root, n, args.shards, MODS)
            print(f"  (generated {n} rows in {time.perf_counter() - t:.0f} s)")
        r = measure(root, args.ranks)
        results["runs"][str(n)] = r
        first = r["ranks"][0]
        print(f"{n:>10} {r['setup_s']['first']:>11.2f} / {r['setup_s']['median']:<10.2f} {first['plan_s']:>7.2f} "
              f"{first['index_bytes'] / 1e6:>13.0f} {r['node_bytes'] / 1e6:>11.0f} "
              f"{r['node_bytes'] / args.ranks / 1e6:>9.0f} {r['in_memory_rank']['anon_growth'] / 1e6:>20.0f}")
        if not args.work:
            shutil.rmtree(root)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
