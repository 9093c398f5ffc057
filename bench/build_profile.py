"""Where a chip's CPU time goes in the shard build: ms of CPU per chip for each part, one process, in one run.

Builds the synthetic set's shards in this process (no worker pool; torch on one thread, as in the build's workers)
with the build's own functions wrapped by timers of the calling thread's CPU time (``time.thread_time``); the
background writer's sha256 and writes are timed on its own thread. Best of ``--repeats`` builds per part.

    python bench/build_profile.py --chips-per-region 24 --repeats 3
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shard_tools.build as build_mod  # noqa: E402
import shard_tools.writer as writer_mod  # noqa: E402
from shard_tools import stats  # noqa: E402
from shard_tools.synth import SynthConfig, synth  # noqa: E402

CPU: collections.Counter = collections.Counter()


def _timed(owner, name: str, part: str | None = None, key=None) -> None:
    """Replace ``owner.name`` by a wrapper adding its thread CPU time to ``CPU[part or key(args)]``."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            CPU[part or key(args)] += time.thread_time() - t

    setattr(owner, name, wrapper)


class _HashTimer:
    """sha256 whose ``update`` time is counted."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, data) -> None:
        t = time.thread_time()
        self._h.update(data)
        CPU["sha256 of the output"] += time.thread_time() - t

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class _FileTimer:
    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        t = time.thread_time()
        try:
            return self._f.write(data)
        finally:
            CPU["writing (copy into the page cache)"] += time.thread_time() - t

    def __getattr__(self, name):
        return getattr(self._f, name)


def _instrument() -> None:
    def decode_part(args) -> str:
        m = args[0]
        if m.file_ext == "nc":
            return "NetCDF decode (gssic, gunw, biomass)"
        return "GeoTIFF decode, S1 + S2" if m.name in ("s1grd", "s2rgbm") else "small GeoTIFFs"

    _timed(build_mod, "decode_chip_file", key=decode_part)
    _timed(build_mod, "to_stored", "encoding, resampling, nodata check")
    _timed(stats.StatsSet, "add", "statistics (train chips)")
    _timed(build_mod, "finalize", "finalize (index, stats, manifest)")
    _timed(build_mod, "make_plan", "planning")
    init = writer_mod.ShardWriter.__init__

    def writer_init(self, fileobj, *args, **kwargs):
        init(self, _FileTimer(fileobj), *args, **kwargs)
        self.sha = _HashTimer()

    writer_mod.ShardWriter.__init__ = writer_init
    _timed(build_mod, "build", "(whole build)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips-per-region", type=int, default=24)
    ap.add_argument("--regions", default="conus,europe")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="m3leo-bench-profile-"))
    try:
        src = work / "src"
        synth(SynthConfig(str(src), tuple(a.regions.split(",")), a.chips_per_region, seed=0), workers=1,
              progress=False)
        for p in src.rglob("*"):  # the source in the page cache, as bench/build.py's first pair
            if p.is_file():
                p.read_bytes()
        _instrument()
        chips = len(a.regions.split(",")) * a.chips_per_region
        best: dict[str, float] = {}
        for _ in range(a.repeats + 1):  # the first build warms imports and caches
            CPU.clear()
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            build_mod.build(build_mod.BuildConfig(str(src), str(out), shard_size=256 * 10**6, workers=1,
                                                  progress=False))
            for part, s in CPU.items():
                best[part] = min(best.get(part, float("inf")), s / chips * 1e3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    whole = best.pop("(whole build)")
    # the writer thread's time is not in the calling thread's whole-build figure; the rest is
    threaded = ("sha256 of the output", "writing (copy into the page cache)")
    main_parts = sum(v for k, v in best.items() if k not in threaded)
    best["rest (tar and npy headers, json, records, publishing)"] = max(0.0, whole - main_parts)
    total = sum(best.values())
    result = {"benchmark": "build_profile", "chips": chips, "ms_per_chip": {k: round(v, 2) for k, v in best.items()},
              "total_ms_per_chip": round(total, 1)}
    print(json.dumps(result))
    for k, v in sorted(best.items(), key=lambda kv: -kv[1]):
        print(f"{k:55s}{v:7.1f} ms/chip")
    print(f"{'total':55s}{total:7.1f} ms/chip")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
