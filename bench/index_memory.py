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


def _smaps(pid: int, under: str) -> dict[str, int]:
    """Of process ``pid``: proportional set size in all (``Pss``), of its anonymous memory (``Pss_Anon``) and file
    mappings (``Pss_File``, the libraries too), and of its mappings of files under ``under`` (``Pss_index``), with
    their resident bytes (``Rss_index``), in bytes.
    Pss counts a page shared by k processes as 1/k in each: summed over the node's ranks, shared pages count once."""
    out = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "Pss_index": 0, "Rss_index": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            head = line.split()
            if head and head[0][:-1] in ("Pss", "Pss_Anon", "Pss_File"):
                out[head[0][:-1]] = int(head[1]) * 1024
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) >= 6 and head[5].startswith(under)
                continue
            if not head:
                continue
            kb = int(head[1]) * 1024 if len(head) > 1 and head[1].isdigit() else 0
            if inside and head[0] == "Pss:":
                out["Pss_index"] += kb
            if inside and head[0] == "Rss:":
                out["Rss_index"] += kb
    return out


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rank(root: str, cache_dir: str, in_memory: bool) -> None:
    """One rank: waits for the go (a line on stdin), runs setup + the first epoch's plan (rank 7 of world size 64)
    until the next epoch's plan, made in the background, is done too; prints what it took, then waits for a line
    on stdin before exiting, so that the parent reads every rank's memory while all are alive."""
    import pyarrow.parquet  # noqa: F401 - as in training: imported before
    import torch  # noqa: F401

    from m3leo_stream.datamodule import M3LEODataModule

    if in_memory:  # a cache_dir that cannot be written: the DataModule's own fall-back holds the arrays in memory
        cache_dir = os.path.join(cache_dir, "not-a-directory")
        Path(cache_dir).write_text("")
    print("ready", flush=True)
    sys.stdin.readline()
    t, cpu = time.perf_counter(), _cpu_s()
    dm = M3LEODataModule(root, inputs=MODS[:-1], targets=MODS[-1:], batch_size=8, num_workers=0,
                         cache_dir=cache_dir)
    dm.setup("fit")
    setup_s, setup_cpu = time.perf_counter() - t, _cpu_s() - cpu
    t = time.perf_counter()
    dm.trainer = SimpleNamespace(global_rank=7, world_size=64, current_epoch=0,  # as rank 7 of 64 sees it
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    sampler = dm.train_dataloader().batch_sampler
    first_s = time.perf_counter() - t
    if sampler._ahead is not None:  # the next epoch's plan, made in the background, is held too
        sampler._ahead[1].result()
    print(json.dumps({"setup_s": setup_s, "setup_cpu_s": setup_cpu, "plan_s": first_s,
                      "plan_next_s": time.perf_counter() - t, "cpu_s": _cpu_s() - cpu,
                      "index_bytes": dm._index.nbytes_held}), flush=True)
    sys.stdin.readline()


def _run_ranks(root: Path, cache: str, ranks: int, in_memory: bool = False) -> list[dict]:
    """Start ``ranks`` rank processes; let them go at once after all have imported; their results, each with its
    smaps figures before (``before``) and after (``after``) setup + planning."""
    cmd = [sys.executable, __file__, "--rank-of", str(root), "--cache-dir", cache] + (["--in-memory"] * in_memory)
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(ranks)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        before = [_smaps(p.pid, cache) for p in procs]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        for r, p, b in zip(results, procs, before):
            r["before"], r["after"] = b, _smaps(p.pid, cache)
        for p in procs:
            p.stdin.write("exit\n")
            p.stdin.flush()
    finally:
        for p in procs:
            p.stdin.close()
            if p.wait(timeout=600):
                raise RuntimeError(f"a rank exited with {p.returncode}")
    return results


def _node(results: list[dict]) -> dict:
    """The node's figures: Pss growth summed over its ranks (shared pages once), split into anonymous memory and the
    mapped index files; also the largest one rank's view of those files (Rss) and per-rank anonymous growth."""
    grow = {k: sum(r["after"][k] - r["before"][k] for r in results)
            for k in ("Pss", "Pss_Anon", "Pss_File", "Pss_index")}
    return {"pss_growth": grow["Pss"], "anon_growth": grow["Pss_Anon"], "index_files_resident": grow["Pss_index"],
            "other_files_growth": grow["Pss_File"] - grow["Pss_index"],
            "index_files_rss_max_rank": max(r["after"]["Rss_index"] for r in results),
            "anon_growth_per_rank": sorted(r["after"]["Pss_Anon"] - r["before"]["Pss_Anon"] for r in results)}


def _du(path: Path) -> dict[str, int]:
    """Bytes on disk of the index directory: the converted index and its derived arrays (catalogue, plans)."""
    out = {"index": 0, "derived": 0}
    for f in path.rglob("*.npy"):
        out["derived" if "derived" in f.parts else "index"] += f.stat().st_size
    return out


def measure(root: Path, ranks: int, in_memory: bool) -> dict:
    cache = tempfile.mkdtemp(prefix="m3leo-bench-index-")
    try:
        cold = _run_ranks(root, cache, ranks)  # the first rank converts; the others wait, then map
        files = _du(Path(cache))
        warm = _run_ranks(root, cache, ranks)  # a requeue on the same node: every rank only maps
        alone = _run_ranks(root, cache, 1, in_memory=True)[0] if in_memory else None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    out = {"cold": {"ranks": cold, "node": _node(cold)}, "warm": {"ranks": warm, "node": _node(warm)},
           "files_on_disk": files}
    for k in ("cold", "warm"):
        s = [r["setup_s"] for r in out[k]["ranks"]]
        out[k]["setup_s"] = {"max": max(s), "median": float(np.median(s))}
        out[k]["ready_s"] = max(r["plan_next_s"] + r["setup_s"] for r in out[k]["ranks"])
        out[k]["setup_cpu_s_max"] = max(r["setup_cpu_s"] for r in out[k]["ranks"])
    if alone is not None:
        out["in_memory_rank"] = {**{k: alone[k] for k in ("setup_s", "setup_cpu_s", "plan_s", "index_bytes")},
                                 "anon_growth": alone["after"]["Pss_Anon"] - alone["before"]["Pss_Anon"]}
    return out


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
    ap.add_argument("--no-in-memory", action="store_true", help="skip the one rank holding the arrays in memory")
    args = ap.parse_args()
    if args.rank_of:
        rank(args.rank_of, args.cache_dir, args.in_memory)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="m3leo-bench-index-roots-"))
    results = {"command": "python bench/index_memory.py " + " ".join(sys.argv[1:]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "modalities": MODS,
               "shards": args.shards, "ranks_per_node": args.ranks, "runs": {}}
    mb = 1e6
    print(f"{args.ranks} ranks per node, {'+'.join(MODS)}, {args.shards} shards; memory in MB (Pss summed over the "
          "ranks: shared pages once)")
    print(f"{'samples':>10} | {'cold: setup s max/med':>21} {'ready s':>7} {'node':>6} {'(anon':>6} {'files)':>6} "
          f"{'rank anon':>9} | {'warm: setup s':>13} {'node':>6} | {'on disk':>7} | {'in memory, 1 rank':>17}")
    for n in args.samples:
        root = work / f"root-{n}"
        if not (root / sf.MANIFEST).exists():
            t = time.perf_counter()
            make_root(root, n, args.shards, MODS)
            print(f"  (generated {n} rows in {time.perf_counter() - t:.0f} s)")
        r = measure(root, args.ranks, in_memory=not args.no_in_memory)
        results["runs"][str(n)] = r
        c, w = r["cold"], r["warm"]
        alone = r.get("in_memory_rank", {}).get("anon_growth", float("nan"))
        print(f"{n:>10} | {c['setup_s']['max']:>10.2f} / {c['setup_s']['median']:<8.2f} {c['ready_s']:>7.2f} "
              f"{c['node']['pss_growth'] / mb:>6.0f} {c['node']['anon_growth'] / mb:>6.0f} "
              f"{c['node']['index_files_resident'] / mb:>6.0f} "
              f"{np.median(c['node']['anon_growth_per_rank']) / mb:>9.0f} | {w['setup_s']['max']:>13.2f} "
              f"{w['node']['pss_growth'] / mb:>6.0f} | {sum(r['files_on_disk'].values()) / mb:>7.0f} | "
              f"{alone / mb:>17.0f}")
        if not args.work:
            shutil.rmtree(root)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
