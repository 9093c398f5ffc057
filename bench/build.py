"""Shard-build throughput next to the I/O ceiling on the same disk, in one run.

The ceiling: the same number of worker processes read every source file's bytes and write as many bytes as the
build produced into files of shard size (fsync'd, as the builder does before publishing). A second, separately
reported ceiling does the same and also sha256-hashes every written byte, as the format requires of the builder
(the manifest holds each shard's sha256); the goal is stated against the first. The build: ``m3leo-shards
build --workers N`` end to end (planning, decoding, resampling, statistics, sha256, publishing, finalize). Both
read a source that is already in the page cache. Repeats alternate the two; medians are reported.

Cold: the same pair again with the page cache dropped before each (root only; ``--no-cold`` skips it), so that the
source is read from the disk — the build's real situation, where a source far larger than memory is read once.

    python bench/build.py --chips-per-region 48 --workers 2 --repeats 3

Parquet (``--parquet``): bytes the build reads from a 2-modality parquet release (synthesized with ``m3leo-shards
synth --parquet``; s1grd + s2rgbm) next to the bytes stored in its parquet files; the goal is at most 1.10 times. The
build runs in this process (one worker) so that the source reader's byte counter (``hub.READ_TOTALS``: bytes taken
from the files, footers and listing included) is this process's. Also reported: the floor, the ``content`` column
chunks of every row group once per reading group that needs rows of it. Synth parquet files hold consecutive grid
chips, of all three splits, in row groups that mix them; the build reads them in reading groups (the shards of all
splits over a run of row groups, built with one reader), so a row group is read once, not once per split's shard.
``--read-group-shards`` and a small ``--shard-size`` give several groups per region (groups are cut between files,
so no row group is read by two).

    python bench/build.py --parquet --chips-per-region 16 --rows-per-group 1,4,16
    python bench/build.py --parquet --chips-per-region 32 --shard-size 41MB --read-group-shards 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard_tools import hub
from shard_tools.build import BuildConfig, build, make_plan, parse_size
from shard_tools.synth import SynthConfig, synth


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _ceiling_worker(args: tuple[list[str], int, int, str, bool]) -> int:
    paths, out_bytes, file_size, out_dir, hash_output = args
    sha = hashlib.sha256() if hash_output else None
    read = 0
    written = 0
    part = 0
    f = open(os.path.join(out_dir, f"part-{os.getpid()}-{part}"), "wb")  # noqa: SIM115 - replaced as parts fill
    for p in paths:
        with open(p, "rb") as src:
            data = src.read()
        read += len(data)
        view = memoryview(data)
        while view and written < out_bytes:
            room = file_size - f.tell()
            chunk = view[: min(room, out_bytes - written)]
            f.write(chunk)
            if sha is not None:
                sha.update(chunk)
            written += len(chunk)
            view = view[len(chunk):]
            if f.tell() >= file_size:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                part += 1
                f = open(os.path.join(out_dir, f"part-{os.getpid()}-{part}"), "wb")  # noqa: SIM115
    while written < out_bytes:  # output larger than input (headers, padding)
        n = min(1 << 24, out_bytes - written)
        f.write(b"\0" * n)
        if sha is not None:
            sha.update(b"\0" * n)
        written += n
    f.flush()
    os.fsync(f.fileno())
    f.close()
    return read


def ceiling(src: Path, out_dir: Path, out_bytes: int, workers: int, file_size: int, hash_output: bool = False) -> float:
    files = [str(p) for p in _files(src)]
    shares = [files[i::workers] for i in range(workers)]
    per = [out_bytes // workers + (1 if i < out_bytes % workers else 0) for i in range(workers)]
    out_dir.mkdir(parents=True)
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_ceiling_worker, [(s, n, file_size, str(out_dir), hash_output) for s, n in zip(shares, per)]))
    return time.perf_counter() - t


def drop_caches() -> bool:
    """Write dirty pages and drop the page cache (needs root); False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def _parquet_floor(src: Path, shard_size: int, read_group_shards: int | None) -> tuple[int, int, int]:
    """Bytes of the ``content`` column chunks of every row group once per reading group that needs rows of it;
    the plan's shards and reading groups."""
    import pyarrow.parquet as pq

    chunk = {}
    for p in _files(src):
        if p.name.endswith(".parquet"):
            md = pq.ParquetFile(p).metadata
            col = md.schema.to_arrow_schema().get_field_index("content")
            for rg in range(md.num_row_groups):
                chunk[(str(p), rg)] = md.row_group(rg).column(col).total_compressed_size
    plan = make_plan(BuildConfig(str(src), "unused", shard_size=shard_size, read_group_shards=read_group_shards,
                                 progress=False))
    groups = {(g, ref.path, ref.row_group) for g, members in enumerate(plan.groups) for i in members
              for c in plan.shards[i].chips for ref in c.files.values()}
    return sum(chunk[(path, rg)] for _, path, rg in groups), len(plan.shards), len(plan.groups)


def parquet_main(a: argparse.Namespace, work: Path) -> dict:
    """Bytes read from a parquet release by a build, against the bytes stored in it."""
    regions = tuple(a.regions.split(","))
    modalities = tuple(a.parquet_modalities.split(","))
    shard_size = parse_size(a.shard_size)
    layouts = []
    for rpg in (int(x) for x in a.rows_per_group.split(",")):
        src = work / f"src-parquet-rpg{rpg}"
        if not src.exists():
            synth(SynthConfig(str(src), regions, a.chips_per_region, seed=0, modalities=modalities, parquet=True,
                              rows_per_group=rpg), workers=a.workers, progress=False)
        parquet = [p for p in _files(src) if p.name.endswith(".parquet")]
        stored = sum(p.stat().st_size for p in parquet)
        floor, n_shards, n_groups = _parquet_floor(src, shard_size, a.read_group_shards)
        out = work / f"out-parquet-rpg{rpg}"
        shutil.rmtree(out, ignore_errors=True)
        hub.READ_TOTALS.reset()
        t = time.perf_counter()
        build(BuildConfig(str(src), str(out), shard_size=shard_size, workers=1, compress=a.compress,
                          read_group_shards=a.read_group_shards, progress=False))
        dt = time.perf_counter() - t
        stats = hub.READ_TOTALS.to_json()
        shutil.rmtree(out)
        read = stats["parquet_bytes"] + stats["index_bytes"]
        layouts.append({
            "rows_per_group": rpg, "parquet_files": len(parquet), "shards": n_shards, "reading_groups": n_groups,
            "stored_bytes": stored, "read_bytes": read,
            "ratio": round(read / stored, 4), "meets_goal": read <= 1.10 * stored,
            "floor_bytes": floor, "ratio_to_floor": round(stats["parquet_bytes"] / floor, 4), "build_s": round(dt, 3),
            "reader": stats,
        })
    return {
        "benchmark": "build_parquet", "machine": f"{platform.node()} {os.cpu_count()} cpus", "workers": 1,
        "chips": len(regions) * a.chips_per_region, "modalities": list(modalities), "shard_size": shard_size,
        "read_group_shards": a.read_group_shards, "goal": 1.10, "layouts": layouts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", default="conus,europe")
    ap.add_argument("--chips-per-region", type=int, default=None, help="default 48, with --parquet 16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", default="256MB")
    ap.add_argument("--compress", default="none")
    ap.add_argument("--workdir", default=None, help="where to put data (default: a temp dir on the same disk)")
    ap.add_argument("--json", default=None, help="also write the result JSON here")
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache pair")
    ap.add_argument("--parquet", action="store_true",
                    help="instead: bytes a build reads from a parquet release vs the bytes stored in it")
    ap.add_argument("--parquet-modalities", default="s1grd,s2rgbm", help="with --parquet: the release's modalities")
    ap.add_argument("--rows-per-group", default="1,4,16", help="with --parquet: row-group sizes to synthesize")
    ap.add_argument("--read-group-shards", type=int, default=None,
                    help="with --parquet: the build's reading-group size in shards (default: the builder's)")
    a = ap.parse_args()
    if a.chips_per_region is None:
        a.chips_per_region = 16 if a.parquet else 48

    work = Path(a.workdir or tempfile.mkdtemp(prefix="m3leo-bench-build-"))
    if a.parquet:
        result = parquet_main(a, work)
        print(json.dumps(result))
        print(f"\n{'rows/group':>10s}{'shards':>8s}{'groups':>8s}{'stored MB':>11s}{'read MB':>10s}"
              f"{'read/stored':>13s}{'floor MB':>10s}{'read/floor':>12s}")
        for r in result["layouts"]:
            print(f"{r['rows_per_group']:>10d}{r['shards']:>8d}{r['reading_groups']:>8d}"
                  f"{r['stored_bytes'] / 1e6:>11.1f}{r['read_bytes'] / 1e6:>10.1f}"
                  f"{r['ratio']:>13.3f}{r['floor_bytes'] / 1e6:>10.1f}{r['ratio_to_floor']:>12.3f}")
        print(f"goal: read/stored <= {result['goal']:.2f}")
        _finish(a, result, work)
        return
    src = work / "src"
    if not src.exists():
        synth(SynthConfig(str(src), tuple(a.regions.split(",")), a.chips_per_region, seed=0), workers=a.workers,
              progress=False)
    src_bytes = sum(p.stat().st_size for p in _files(src))
    for p in _files(src):  # warm the page cache for both contenders
        p.read_bytes()
    chips = len(a.regions.split(",")) * a.chips_per_region
    builds, ceilings, sha_ceilings = [], [], []
    cold_builds, cold_ceilings = [], []
    cold = a.cold and drop_caches()
    if a.cold and not cold:
        print("cold-cache runs skipped: dropping the page cache needs root", file=sys.stderr)
    out_bytes = 0
    for r in range(a.repeats):
        for p in _files(src):  # warm again after a cold pair
            p.read_bytes()
        out = work / f"out-{r}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        build(BuildConfig(str(src), str(out), shard_size=parse_size(a.shard_size), workers=a.workers,
                          compress=a.compress, progress=False))
        builds.append(time.perf_counter() - t)
        out_bytes = sum(p.stat().st_size for p in out.rglob("*.tar"))
        shutil.rmtree(out)
        cdir = work / f"ceiling-{r}"
        ceilings.append(ceiling(src, cdir, out_bytes, a.workers, parse_size(a.shard_size)))
        shutil.rmtree(cdir)
        sha_ceilings.append(ceiling(src, cdir, out_bytes, a.workers, parse_size(a.shard_size), hash_output=True))
        shutil.rmtree(cdir)
        if cold:
            drop_caches()
            t = time.perf_counter()
            build(BuildConfig(str(src), str(out), shard_size=parse_size(a.shard_size), workers=a.workers,
                              compress=a.compress, progress=False))
            cold_builds.append(time.perf_counter() - t)
            shutil.rmtree(out)
            drop_caches()
            cold_ceilings.append(ceiling(src, cdir, out_bytes, a.workers, parse_size(a.shard_size)))
            shutil.rmtree(cdir)
    b, c = statistics.median(builds), statistics.median(ceilings)
    cs = statistics.median(sha_ceilings)
    result = {
        "benchmark": "build", "machine": f"{platform.node()} {os.cpu_count()} cpus", "workers": a.workers,
        "chips": chips, "source_mb": round(src_bytes / 1e6, 1), "output_mb": round(out_bytes / 1e6, 1),
        "compress": a.compress,
        "build_s": round(b, 3), "build_chips_per_s": round(chips / b, 1),
        "build_mb_per_s": round(src_bytes / b / 1e6, 1),
        "ceiling_s": round(c, 3), "ceiling_chips_per_s": round(chips / c, 1),
        "ceiling_mb_per_s": round(src_bytes / c / 1e6, 1), "ratio": round(c / b, 3), "goal": 0.5,
        "ceiling_sha256_s": round(cs, 3), "ceiling_sha256_chips_per_s": round(chips / cs, 1),
        "ceiling_sha256_mb_per_s": round(src_bytes / cs / 1e6, 1), "ratio_sha256": round(cs / b, 3),
        # the least-disturbed repeat of each (min), a supplementary figure for a shared, noisy machine
        "ratio_best": round(min(ceilings) / min(builds), 3),
        "ratio_sha256_best": round(min(sha_ceilings) / min(builds), 3),
        "repeats": {"build_s": [round(x, 3) for x in builds], "ceiling_s": [round(x, 3) for x in ceilings],
                    "ceiling_sha256_s": [round(x, 3) for x in sha_ceilings]},
    }
    if cold:
        cb, cc = statistics.median(cold_builds), statistics.median(cold_ceilings)
        result["cold"] = {
            "build_s": round(cb, 3), "build_chips_per_s": round(chips / cb, 1),
            "build_mb_per_s": round(src_bytes / cb / 1e6, 1), "ceiling_s": round(cc, 3),
            "ceiling_chips_per_s": round(chips / cc, 1), "ceiling_mb_per_s": round(src_bytes / cc / 1e6, 1),
            "ratio": round(cc / cb, 3), "ratio_best": round(min(cold_ceilings) / min(cold_builds), 3),
            "repeats": {"build_s": [round(x, 3) for x in cold_builds],
                        "ceiling_s": [round(x, 3) for x in cold_ceilings]},
        }
    print(json.dumps(result))
    print(f"\n{'':24s}{'chips/s':>10s}{'MB/s (source)':>16s}")
    print(f"{f'build (--workers {a.workers})':24s}{result['build_chips_per_s']:>10.1f}"
          f"{result['build_mb_per_s']:>16.1f}")
    print(f"{'ceiling (read+write)':24s}{result['ceiling_chips_per_s']:>10.1f}{result['ceiling_mb_per_s']:>16.1f}")
    print(f"{'ceiling + sha256':24s}{result['ceiling_sha256_chips_per_s']:>10.1f}"
          f"{result['ceiling_sha256_mb_per_s']:>16.1f}")
    print(f"ratio build/ceiling = {result['ratio']:.2f} (goal >= 0.5); "
          f"build/(ceiling + sha256) = {result['ratio_sha256']:.2f} (medians); best repeats: "
          f"{result['ratio_best']:.2f} and {result['ratio_sha256_best']:.2f}")
    if cold:
        c = result["cold"]
        print("\ncold page cache (source read from disk):")
        print(f"{f'build (--workers {a.workers})':24s}{c['build_chips_per_s']:>10.1f}{c['build_mb_per_s']:>16.1f}")
        print(f"{'ceiling (read+write)':24s}{c['ceiling_chips_per_s']:>10.1f}{c['ceiling_mb_per_s']:>16.1f}")
        print(f"ratio build/ceiling = {c['ratio']:.2f} (median); best repeats: {c['ratio_best']:.2f}")
    _finish(a, result, work)


def _finish(a: argparse.Namespace, result: dict, work: Path) -> None:
    """Write the results (``--json``) and remove the scratch folder unless ``--workdir`` keeps it."""
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
