"""Build-side scaling without pixels: peak memory and time of finalize, verify and stats at several shard counts,
side by side with the branch point's in-memory versions, and the per-task cost of reading a share of the plan.

Records: ``--shards`` synthetic shard records with the real layout (every index column of all nine modalities,
member and chunk digests, train shards' statistics states from real ``ModalityStats`` of random chips (200 values
a band), 6 regions, 60/20/20 splits), ``--samples-per-shard`` samples each (the release has ~283; fewer keep the disk
use small, the per-shard record is what finalize holds one of at a time). Each operation runs in a fresh process;
its peak RSS (``VmHWM``, see ``_rss_mb``) is reported with the RSS of a process that only imported the same modules.

finalize runs three ways on the same records: the branch point's in-memory merge, the streaming one reading every
record (a one-task build), and the streaming one merging the partial indexes that ``--tasks`` array tasks write as
they end (``shard_tools.partials``; their writing is timed too, one task after another here, in parallel in an
array). From ``--sparse-from`` shards on, the partials are written as the records are made and the records are kept
only as sparse placeholders (a 60k-shard set of records is ~26 GB), so only finalize from partials, verify and
stats run there. verify finds no tar files (each shard costs a missing-file check: what is measured is its index
side); stats reads members through a stub returning a (bands, 2, 2) array and ``ModalityStats.add`` only counts (the
per-sample pixel work, ~48 ms, is measured elsewhere); the per-shard accumulators, their states and the merge are
real.

Listing: a hub-layout tree of ``--files`` empty chip files (9 modality folders) is planned once by the plan step;
each of ``--tasks`` tasks then reads its share of the plan. Printed next to what every task did before (catalogue
the whole source with ``make_plan``), in the same run (CPU seconds, the machine is shared).

    python bench/build_scale.py --shards 1500,15000,60000 --samples-per-shard 20 --files 225000 --tasks 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]
BRANCH_POINT = "7389408"
REGIONS = [f"region{i}" for i in range(6)]


def _rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM``, its own address space's high-water mark. ``ru_maxrss`` would not
    do: Linux carries it across ``execve`` from the forked copy of the parent, so a child started by a driver that
    holds records would report at least the driver's RSS."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_records(root: Path, num_shards: int, per_shard: int, seed: int = 0, sparse_tasks: int = 0) -> None:
    """A build output whose every shard record is written and whose plan lists them (no tar files).

    ``sparse_tasks``: also write the partial indexes of that many array tasks from the records as they are made
    (``write_partial`` given them, as a build task would read them), and keep each record on disk only as an empty
    sparse placeholder (finalize from partials reads none of them, only their sizes; 60k real records would take
    ~26 GB)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m3leo_stream import shard_format as sf
    from m3leo_stream.modalities import REGISTRY
    from shard_tools.build import BuildConfig
    from shard_tools.downsample import entry_json
    from shard_tools.stats import ModalityStats

    rng = np.random.default_rng(seed)
    mods = list(REGISTRY.select(None))
    states = {}
    for m in mods:
        st = ModalityStats(m)
        shape = (len(m.bands), 64, 64)
        if m.np_dtype.kind == "f":
            a = rng.normal(0, 1e-3, shape).astype(m.np_dtype)
        else:
            info = np.iinfo(m.np_dtype)
            a = rng.integers(max(info.min, 0), min(info.max, 200), shape).astype(m.np_dtype)
        st.add(a)
        states[m.name] = st.state()
    shards = []
    for i in range(num_shards):
        region = REGIONS[i % len(REGIONS)]
        split = ("train", "train", "train", "val", "test")[(i // len(REGIONS)) % 5]
        shards.append((sf.shard_name(region, split, i), region, split))
    (root / "_build" / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"path": [s[0] for s in shards], "region": [s[1] for s in shards],
                             "split": [s[2] for s in shards], "group": list(range(num_shards))}),
                   root / "_build" / "plan-bench.shards.parquet")
    header = {"format_version": sf.FORMAT_VERSION, "args": BuildConfig("src", str(root)).content_args(),
              "modalities": [m.name for m in mods], "modality_entries": {m.name: entry_json(m, {}) for m in mods},
              "regions": REGIONS, "folders": {r: {} for r in REGIONS}, "discrepancies": {}, "invalid": {},
              "tables": {"shards": "plan-bench.shards.parquet", "chips": "plan-bench.chips.parquet"},
              "num_tasks": 1, "num_shards": num_shards}
    (root / "_build" / "plan.json").write_text(json.dumps(header))
    states_json = json.dumps(states)
    sizes = {sf.JSON_MEMBER: 2048, **{m.name: m.nbytes for m in mods}}
    members = [sf.JSON_MEMBER] + [m.name for m in mods]

    def records(numbers):
        for n in numbers:
            yield one_record(n, *shards[n])

    def one_record(n, path, region, split):
        rows: dict[str, list] = {"key": [f"{n:08x}{k:05x}" for k in range(per_shard)], "region": [region] * per_shard,
                                 "split": [split] * per_shard, "shard": [path] * per_shard,
                                 "lon": rng.uniform(-180, 180, per_shard).tolist(),
                                 "lat": rng.uniform(-60, 60, per_shard).tolist()}
        step = sum(512 + -(-sizes[m] // 512) * 512 for m in members)
        base = np.arange(per_shard, dtype=np.int64) * step
        off = 0
        for member in members:
            rows[sf.offset_column(member)] = (base + off + 512).tolist()
            rows[sf.nbytes_column(member)] = [sizes[member]] * per_shard
            rows[sf.checksum_column(member)] = rng.integers(0, 2**63, per_shard).tolist()
            if member != sf.JSON_MEMBER:
                rows[sf.chunks_checksum_column(member)] = rng.integers(0, 2**63, per_shard).tolist()
            off += 512 + -(-sizes[member] // 512) * 512
        record = {"path": path, "region": region, "split": split, "bytes": per_shard * step + 1024,
                  "sha256": "0" * 64, "num_samples": per_shard, "rows": rows,
                  "errors": [], "skipped_chips": 0, "skipped_members": 0, "empty_members": 0, "empty_examples": [],
                  "encodings": {f"{m.name}\traw": per_shard for m in mods}, "resolutions": {}}
        rec = root / "_build" / "shards" / (path[: -len(".tar")] + ".json")
        rec.parent.mkdir(parents=True, exist_ok=True)
        if sparse_tasks:  # a placeholder: finalize from partials checks only that its size is the one noted
            with open(rec, "wb") as f:
                f.truncate(1 + n)
            record["stats"] = states if split == "train" else None
            return record, 1 + n
        text = json.dumps(record)
        text = text[:-1] + ', "stats": ' + (states_json if split == "train" else "null") + "}"
        rec.write_text(text)
        return record, len(text)

    if not sparse_tasks:
        for _ in records(range(num_shards)):
            pass
        return
    from m3leo_stream.storage import get_fs
    from shard_tools.partials import write_partial

    fs = get_fs(str(root))[0]
    for t in range(sparse_tasks):
        write_partial(fs, str(root), header, t, sparse_tasks, records(range(t, num_shards, sparse_tasks)))


def _legacy_module(name: str, path: str):
    """The branch point's version of a module, from git."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{BRANCH_POINT}:{path}"], capture_output=True,
                          text=True, check=True).stdout
    f = Path(tempfile.mkdtemp()) / f"{name}.py"
    f.write_text(text)
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def child(op: str, root: str) -> dict:
    """Run one operation in this (fresh) process; its time and peak RSS."""
    import numpy as np

    import shard_tools.build as b
    import shard_tools.verify as v
    from m3leo_stream.shard_root import ShardRoot

    sys.path.insert(0, str(REPO / "tests" / "shard_tools"))
    import legacy_finalize as lf

    def stub(self, row, modality):
        m = self.modalities[modality]
        return np.zeros((len(m.bands), 2, 2), m.np_dtype)

    ShardRoot.read_member = stub
    from shard_tools.stats import ModalityStats

    def add(self, array):  # no pixel work: the accumulators are allocated, their states serialised and merged
        self.samples += 1
        self.total += array[0].size

    ModalityStats.add = add
    old_verify = _legacy_module("legacy_verify", "shard_tools/verify.py") if "legacy" in op else None
    start_rss = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    extra: dict = {}
    if op in ("finalize", "finalize_records"):
        b.finalize(root)
    elif op.startswith("partials/"):  # what each of n array tasks writes as it ends, one after another
        from m3leo_stream.storage import get_fs
        from shard_tools import plan_io
        from shard_tools.partials import write_partial

        fs = get_fs(root)[0]
        header = plan_io.read_header(fs, root)
        n = int(op.split("/")[1])
        extra["task_seconds"] = []
        for t in range(n):
            t1 = time.perf_counter()
            write_partial(fs, root, header, t, n)
            extra["task_seconds"].append(time.perf_counter() - t1)
    elif op == "legacy_finalize":
        lf.legacy_finalize(root)
    elif op == "verify":
        v.verify(root, workers=2, progress=False)
    elif op == "verify_task":
        v.verify(root, workers=2, progress=False, task_index=0, num_tasks=8, results=tempfile.mkdtemp())
    elif op == "legacy_verify":
        old_verify.verify(root, workers=2, progress=False)
    elif op == "stats":
        v.recompute_stats(root, progress=False)
    elif op == "legacy_stats":
        old_verify.recompute_stats(root, progress=False)
    elif op == "plan":  # the plan step of an 8-task build over ROOT/tree (see listing_bench)
        from shard_tools.build import BuildConfig, plan_build

        plan_build(BuildConfig(f"{root}/tree", f"{root}/plan-out", shard_size=10**9, progress=False, num_tasks=8))
    elif op != "baseline":
        raise ValueError(op)
    return {"op": op, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "peak_rss_mb": _rss_mb(), "rss_before_mb": start_rss, **extra}


def run_child(op: str, root: Path, limit_mb: float) -> dict:
    """Run ``op`` in a fresh process; stopped (and reported as over the limit) when its RSS passes ``limit_mb``,
    so that the in-memory versions cannot take a shared machine's memory."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", op, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
            peak = max(peak, rss)
        except (OSError, StopIteration):
            pass
        if peak > limit_mb:
            proc.kill()
            proc.wait()
            return {"op": op, "peak_rss_mb": None, "over_limit_mb": limit_mb, "seconds": None}
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        print(f"{op} failed: {err[-3000:]}", file=sys.stderr, flush=True)
        return {"op": op, "peak_rss_mb": None, "failed": err.strip().splitlines()[-1], "seconds": None}
    return json.loads(out.strip().splitlines()[-1])


def memory_bench(counts: list[int], per_shard: int, work: Path, limit_mb: float, tasks: int,
                 sparse_from: int) -> dict:
    """Each count: the shard records; finalize from them (the branch point's in-memory one and the streaming one),
    the partial indexes of ``tasks`` array tasks, finalize from those; verify and stats. From ``sparse_from``
    shards on, the partials are written with the records and these kept as sparse files (see ``make_records``):
    only the partial finalize, verify and stats run there."""
    import hashlib

    def digest(root: Path) -> dict:
        manifest = json.loads((root / "manifest.json").read_text())
        manifest.pop("created")
        return {"index": hashlib.sha256((root / "index.parquet").read_bytes()).hexdigest(),
                "stats": hashlib.sha256((root / "stats.json").read_bytes()).hexdigest(),
                "manifest": hashlib.sha256(json.dumps(manifest).encode()).hexdigest()}

    res: dict = {}
    for n in counts:
        root = work / f"records-{n}"
        sparse = n >= sparse_from
        t0 = time.perf_counter()
        make_records(root, n, per_shard, sparse_tasks=tasks if sparse else 0)
        made = time.perf_counter() - t0
        print(f"[{n} shards] records{' and partials' if sparse else ''} written in {made:.0f} s", file=sys.stderr,
              flush=True)
        r: dict = {"sparse": sparse, "setup_seconds": made, "baseline": run_child("baseline", root, limit_mb)}
        outputs = {}
        if not sparse:
            r["legacy_finalize"] = run_child("legacy_finalize", root, limit_mb)
            if r["legacy_finalize"]["peak_rss_mb"] is not None:
                outputs["legacy_finalize"] = digest(root)
            r["finalize_records"] = run_child("finalize_records", root, limit_mb)
            outputs["finalize_records"] = digest(root)
            r["partials"] = run_child(f"partials/{tasks}", root, limit_mb)
        r["finalize"] = run_child("finalize", root, limit_mb)
        outputs["finalize"] = digest(root)
        r["outputs"] = outputs
        r["identical"] = len({json.dumps(d, sort_keys=True) for d in outputs.values()}) == 1 if len(outputs) > 1 \
            else None
        for op in ("legacy_verify", "verify", "verify_task", "legacy_stats", "stats"):
            if not (sparse and op.startswith("legacy")):
                r[op] = run_child(op, root, limit_mb)
        res[str(n)] = r
        print(json.dumps({n: r}), file=sys.stderr, flush=True)
        shutil.rmtree(root)
    return res


def make_tree(src: Path, files: int, seed: int = 0) -> int:
    """A one-region hub tree of empty chip files in the 9 synth folders; returns the file count."""
    from shard_tools.synth import SynthConfig, synth

    tiny = src.parent / "tiny"
    synth(SynthConfig(str(tiny), ("conus",), 1, seed=seed), workers=1, progress=False)
    region = next(tiny.iterdir())
    stem_dir = next(p for p in region.iterdir() if p.is_dir())
    csv = next(region.glob("*_splits_*.csv"))
    folders = {p.name: next(p.iterdir()).suffix if any(p.iterdir()) else ".tif" for p in stem_dir.iterdir()}
    folders = {k: (".nc" if v == ".skipped" else v) for k, v in folders.items()}
    chips = files // len(folders)
    out_region = src / region.name
    out_stem = out_region / stem_dir.name
    idents = [f"{i:013x}" for i in range(chips)]
    for folder, ext in folders.items():
        d = out_stem / folder
        d.mkdir(parents=True)
        for ident in idents:
            (d / f"{ident}{ext}").touch()
    splits = ("train", "train", "train", "val", "test")
    (out_region / csv.name).write_text("identifier,split\n" + "".join(
        f"{ident},{splits[i % 5]}\n" for i, ident in enumerate(idents)))
    shutil.rmtree(tiny)
    return chips * len(folders)


def listing_bench(files: int, tasks: int, work: Path) -> dict:
    from shard_tools import plan_io
    from shard_tools.build import BuildConfig, get_fs, make_plan, plan_build

    src, out = work / "tree", work / "out"
    t0 = time.perf_counter()
    n = make_tree(src, files)
    print(f"[listing] {n} files made in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    cfg = dict(shard_size=10**9, progress=False, num_tasks=tasks)

    def cpu(fn):
        c0, t0 = time.process_time(), time.perf_counter()
        value = fn()
        return value, time.process_time() - c0, time.perf_counter() - t0

    plan_rss = run_child("plan", work, 16000)  # its peak RSS in a fresh process (the timings below are in this one)
    plan, full_cpu, full_wall = cpu(lambda: make_plan(BuildConfig(str(src), str(out), **cfg)))
    header, plan_cpu, plan_wall = cpu(lambda: plan_build(BuildConfig(str(src), str(out), **cfg)))
    _, reuse_cpu, reuse_wall = cpu(lambda: plan_build(BuildConfig(str(src), str(out), **cfg)))
    fs = get_fs(str(out))[0]
    per_task = []
    for t in range(tasks):
        share, c, w = cpu(lambda: plan_io.read_share(fs, str(out), header, t, tasks))
        per_task.append({"task": t, "chips": sum(len(s.chips) for g in share for s in g), "cpu_seconds": c,
                         "seconds": w})
    whole, whole_cpu, whole_wall = cpu(lambda: plan_io.read_share(fs, str(out), header, 0, 1))
    return {"files": n, "chips": header["num_chips"], "shards": header["num_shards"], "tasks": tasks,
            "every_task_before": {"cpu_seconds": full_cpu, "seconds": full_wall},
            "plan_step_once": {"cpu_seconds": plan_cpu, "seconds": plan_wall},
            "plan_step_peak_rss_mb": plan_rss["peak_rss_mb"], "baseline_rss_mb": plan_rss["rss_before_mb"],
            "plan_step_rerun_unchanged": {"cpu_seconds": reuse_cpu, "seconds": reuse_wall},
            "read_whole_plan": {"cpu_seconds": whole_cpu, "seconds": whole_wall},
            "per_task": per_task}


OPS = {"legacy_finalize": "finalize, branch point", "finalize_records": "finalize from records",
       "partials": "partials, all tasks", "finalize": "finalize from partials", "legacy_verify": "verify, branch point",
       "verify": "verify", "verify_task": "verify, task 1 of 8", "legacy_stats": "stats, branch point",
       "stats": "stats"}


def report(res: dict) -> None:
    mem = res.get("memory", {})
    if mem:
        print(f"\npeak RSS, MB (time), fresh process each, {res['samples_per_shard']} samples a shard; '-': not run "
              "(records kept as placeholders there, see make_records)")
        counts = list(mem)
        print(f"{'':26}" + "".join(f"{c + ' shards':>18}" for c in counts))
        print(f"{'baseline (imports)':26}" + "".join(f"{mem[c]['baseline']['peak_rss_mb']:>18.0f}" for c in counts))

        def cell(r: dict | None) -> str:
            if r is None:
                return f"{'-':>18}"
            if r.get("failed"):
                return f"{'failed':>18}"
            if r["peak_rss_mb"] is None:
                return f"{'> ' + str(int(r['over_limit_mb'])) + ' (stopped)':>18}"
            return f"{r['peak_rss_mb']:>11.0f} ({r['seconds']:>4.0f}s)"

        for op, label in OPS.items():
            print(f"{label:26}" + "".join(cell(mem[c].get(op)) for c in counts))
        print(f"{'  slowest task':26}" + "".join(
            f"{max(mem[c]['partials']['task_seconds']):>17.0f}s" if mem[c].get("partials", {}).get("task_seconds")
            else f"{'-':>18}" for c in counts))
        print(f"{'records (+partials) made':26}" + "".join(f"{mem[c]['setup_seconds']:>17.0f}s" for c in counts))
        print("CPU seconds (the wall times above include waiting for a shared machine's cores)")
        for op, label in OPS.items():
            if any(mem[c].get(op, {}).get("cpu_seconds") for c in counts):
                print(f"{label:26}" + "".join(f"{mem[c][op]['cpu_seconds']:>17.1f}s" if mem[c].get(op, {}).get(
                    "cpu_seconds") is not None else f"{'-':>18}" for c in counts))
        print("index, stats and manifest byte-identical across the finalizes run: "
              + ", ".join(f"{c}: {mem[c]['identical']} ({'/'.join(mem[c]['outputs'])})" for c in counts))
        for op in ("finalize", "verify", "verify_task", "stats"):
            over = [mem[c][op]["peak_rss_mb"] - mem[c]["baseline"]["peak_rss_mb"] for c in counts
                    if mem[c].get(op, {}).get("peak_rss_mb")]
            if over:
                print(f"  {OPS[op]}: above the baseline {min(over):.0f}..{max(over):.0f} MB over "
                      f"{counts[0]}..{counts[-1]} shards")
    lst = res.get("listing")
    if lst:
        print(f"\nlisting: {lst['files']} files, {lst['chips']} chips, {lst['shards']} shards, {lst['tasks']} tasks "
              "(CPU s)")
        print(f"  every task before (make_plan of all): {lst['every_task_before']['cpu_seconds']:.2f}")
        print(f"  plan step, once:                      {lst['plan_step_once']['cpu_seconds']:.2f}")
        print(f"  plan step rerun, source unchanged:    {lst['plan_step_rerun_unchanged']['cpu_seconds']:.3f}")
        print(f"  reading the whole plan (1 task):      {lst['read_whole_plan']['cpu_seconds']:.3f}")
        full = lst["every_task_before"]["cpu_seconds"]
        whole = lst["read_whole_plan"]["cpu_seconds"]
        for t in lst["per_task"]:
            print(f"  task {t['task']}: {t['chips']:>7} chips ({t['chips'] / lst['chips']:.3f} of all) "
                  f"{t['cpu_seconds']:.3f} s = {t['cpu_seconds'] / whole:.3f} of reading the whole plan, "
                  f"{t['cpu_seconds'] / full:.4f} of listing")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="1500,15000")
    p.add_argument("--samples-per-shard", type=int, default=40)
    p.add_argument("--files", type=int, default=225_000)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--skip", default="", help="memory,listing")
    p.add_argument("--sparse-from", type=int, default=30_000,
                   help="from this many shards on, keep records as sparse files (partials written with them)")
    p.add_argument("--json", default=None)
    p.add_argument("--limit-mb", type=float, default=8000, help="stop an operation whose RSS passes this")
    p.add_argument("--child", nargs=2, metavar=("OP", "ROOT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    from bench.machine import cpu_name

    work = Path(tempfile.mkdtemp(prefix="m3leo-scale-"))
    res: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "samples_per_shard": a.samples_per_shard}
    try:
        if "memory" not in a.skip:
            res["memory"] = memory_bench([int(x) for x in a.shards.split(",")], a.samples_per_shard, work,
                                         a.limit_mb, a.tasks, a.sparse_from)
        if "listing" not in a.skip:
            res["listing"] = listing_bench(a.files, a.tasks, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["limit_mb"] = a.limit_mb
    report(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
