"""Shard-build time of this checkout next to another one (e.g. main), alternating, in one run.

Each round runs, for each checkout, a fresh Python process from that checkout's root that builds the same synthetic
source twice with ``--workers 2`` and reports the second build (the first starts the worker fork server, as the
first repeat of ``bench/build.py`` does). Both builds' outputs must be byte-identical (shards, index, stats).

    git worktree add ../m3leo-baseline <commit>        # the code to compare against
    python bench/build_compare.py --baseline ../m3leo-baseline --chips-per-region 48 --rounds 3
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
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, shutil, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from shard_tools.build import BuildConfig, build
import shard_tools.build as b
assert b.__file__.startswith({root!r}), b.__file__

if __name__ == "__main__":
    out = Path({out!r})
    times = []
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        build(BuildConfig({src!r}, str(out), shard_size=256 * 10**6, workers={workers}, progress=False))
        times.append(time.perf_counter() - t)
    files = sorted(p for p in out.rglob("*") if p.suffix in (".tar", ".parquet") or p.name == "stats.json")
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(out)).encode() + hashlib.sha256(p.read_bytes()).digest())
    shutil.rmtree(out)
    print(json.dumps({{"build_s": times[1], "first_build_s": times[0], "digest": digest.hexdigest()}}))
"""


def run_child(root: Path, src: Path, out: Path, workers: int) -> dict:
    script = out.parent / f"child-{root.name}.py"
    script.write_text(CHILD.format(root=str(root), src=str(src), out=str(out), workers=workers))
    # the fork server imports shard_tools from the working directory: run from the checkout's root
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="root of the other checkout (e.g. a worktree of main)")
    ap.add_argument("--regions", default="conus,europe")
    ap.add_argument("--chips-per-region", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from shard_tools.synth import SynthConfig, synth

    work = Path(a.workdir or tempfile.mkdtemp(prefix="m3leo-bench-cmp-"))
    src = work / "src"
    if not src.exists():
        synth(SynthConfig(str(src), tuple(a.regions.split(",")), a.chips_per_region, seed=0), workers=a.workers,
              progress=False)
    roots = {"baseline": Path(a.baseline).resolve(), "this": HERE}
    times: dict[str, list[float]] = {k: [] for k in roots}
    digests: dict[str, set[str]] = {k: set() for k in roots}
    for r in range(a.rounds):
        for name in (("baseline", "this") if r % 2 == 0 else ("this", "baseline")):
            res = run_child(roots[name], src, work / f"out-{name}", a.workers)
            times[name].append(round(res["build_s"], 3))
            digests[name].add(res["digest"])
    b, t = statistics.median(times["baseline"]), statistics.median(times["this"])
    chips = len(a.regions.split(",")) * a.chips_per_region
    result = {
        "benchmark": "build_compare", "machine": f"{platform.node()} {os.cpu_count()} cpus (CPU)",
        "workers": a.workers, "chips": chips, "baseline": str(roots["baseline"]),
        "baseline_build_s": b, "this_build_s": t, "speedup": round(b / t, 2),
        "identical_output": len(digests["baseline"] | digests["this"]) == 1,
        "rounds": times,
    }
    print(json.dumps(result))
    print(f"\nbaseline {b:.2f} s ({chips / b:.1f} chips/s), this {t:.2f} s ({chips / t:.1f} chips/s): "
          f"{b / t:.2f}x; outputs identical: {result['identical_output']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
