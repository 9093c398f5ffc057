"""What a node-cache miss costs the reader while the cache is full, by how many entries it holds.

A full cache of N tiny entries (the cost is per entry, not per byte), a plan that reads N more rows: each read is a
miss that evicts by next use and publishes. Printed per N: microseconds per miss, for this checkout's cache and, run
side by side in the same way, for another checkout's (``--other PATH``, e.g. a worktree of an earlier commit), each in
a process of its own::

    python bench/cache_admission.py --entries 1000 10000 100000 --other /tmp/old-checkout

Results: bench/results/cache_admission.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # bytes per entry


class _Source:
    """Entries of ``SIZE`` bytes, fetched from memory."""

    def __init__(self, rows: int):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def entry_size(self, row: int) -> int:
        return SIZE

    def fetch_entry(self, row: int, counters) -> bytes:
        return row.to_bytes(8, "little") * (SIZE // 8)

    def entry_matches(self, row: int, data: bytes) -> bool:
        return data == self.fetch_entry(row, None)


def one(n: int, misses: int, work: Path, rows: int | None = None) -> dict:
    """In this process (the checkout on ``sys.path``): a cache holding ``n`` entries, then ``misses`` misses; the
    index has ``rows`` rows (default: the rows read)."""
    import numpy as np

    from m3leo_stream.node_cache import NodeCache, NodePlan
    from m3leo_stream.planner import EpochPlan
    from m3leo_stream.storage import IOCounters

    src = _Source(max(rows or 0, n + misses))
    directory = work / f"cache-{n}"
    directory.mkdir(parents=True)
    for r in range(n):  # held already, as after a requeue
        (directory / str(r)).write_bytes(src.fetch_entry(r, None))
    # the misses, read again soon (so each is admitted, evicting a held row), then the held rows
    fresh = np.arange(n, n + misses)
    refs = np.concatenate([fresh, fresh, np.arange(n)]).astype(np.int64)
    clock = [(0, 0)]
    plan = NodePlan(lambda e: EpochPlan(refs if e == 0 else refs[:0], 1), lambda: clock[0], 0, 1, [0])
    t = time.perf_counter()
    cache = NodeCache(directory, n * SIZE, src, plan, prefetch=0)
    plan.next_use(0, 0)  # learn the plan outside the timing
    open_s = time.perf_counter() - t
    io = IOCounters()
    times = []
    for g in range(misses):
        clock[0] = (0, g)
        t = time.perf_counter()
        assert cache.get(int(refs[g]), io) is not None
        times.append(time.perf_counter() - t)
    held = sum(1 for p in directory.iterdir() if p.name.isdigit())
    assert held <= n, held
    return {"entries": n, "open_s": open_s, "miss_us_median": statistics.median(times) * 1e6,
            "miss_us_mean": statistics.fmean(times) * 1e6, "fetched": cache.stats.fetched,
            "evicted": cache.stats.evicted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--misses", type=int, default=300)
    ap.add_argument("--rows", type=int, help="rows in the index (default: those read, entries + misses)")
    ap.add_argument("--other", help="another checkout to run side by side")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cache_admission.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.misses, Path(args.work), args.rows)))
        return
    checkouts = {"this": REPO} | ({"other": Path(args.other).resolve()} if args.other else {})
    results: dict = {"command": "python bench/cache_admission.py " + " ".join(sys.argv[1:]),
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "misses": args.misses,
                     "rows": args.rows, "entry_bytes": SIZE, "runs": {}}
    print(f"full cache of N entries of {SIZE} B, {args.misses} misses (each read again soon: admitted, evicting by "
          "next use); µs per miss (median / mean) and seconds to open the cache")
    print(f"{'N':>8} | " + " | ".join(f"{name:>26}" for name in checkouts))
    for n in args.entries:
        row = {}
        for name, root in checkouts.items():
            work = Path(tempfile.mkdtemp(prefix="m3leo-bench-admission-"))
            try:
                env = {**os.environ, "PYTHONPATH": str(root)}
                rows = [] if args.rows is None else ["--rows", str(args.rows)]
                out = subprocess.run([sys.executable, __file__, "--one", str(n), "--misses", str(args.misses),
                                      "--work", str(work), *rows], env=env, capture_output=True, text=True,
                                     check=True)
                row[name] = json.loads(out.stdout.strip().splitlines()[-1])
            finally:
                shutil.rmtree(work, ignore_errors=True)
        results["runs"][str(n)] = row
        print(f"{n:>8} | " + " | ".join(
            f"{r['miss_us_median']:>9.0f} / {r['miss_us_mean']:>7.0f}  {r['open_s']:>5.2f} s" for r in row.values()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
