"""What the node cache's plan (m3leo_stream/node_cache.py ``NodePlan``) costs a rank at the release's scale.

A training catalogue of ``--samples`` rows (6 regions, 60k shards; no shard root: the planner works on the
catalogue's arrays) planned as the DataModule plans it, batch 8 on 64 ranks (global batch 512); the epochs' plans are
written as ``.npy`` files and mapped, as ranks map the node's plans. Rank 7, whose node runs ranks 0–7, then builds
its NodePlan in a process of its own: with its own arrays (``NodePlan``), with the node's keys mapped from a file
(``NodePlan(share=...)``, as the DataModule shares them through ``node_arrays``: one rank builds them, the others
map them; measured here as a rank that maps), and with the per-row Python lists the arrays replace
(``ListNodePlan`` below); alternating, ``--repeats`` times. It reports medians of:
  - seconds to learn the first two epochs (the first lookup) and then one more (the clock reaches epoch 1: epoch 2 is
    learned, epoch 0 forgotten),
  - memory: the arrays' bytes, the process's anonymous RSS growth (the mapped plans and keys left out), and a node's
    (8 × that + the mapped keys, held once in the page cache),
  - the cost of a call: ``next_use`` of one row, ``ahead(32)`` (every read of a sample), ``consume``, the next uses
    of 10k rows (``next_uses``; a ``next_use`` a row for the lists), and ranking 10k and 100k held entries by next
    use as ``NodeCache._victims`` does (``next_uses`` + argsort against a sort of per-entry ``next_use`` calls).

    python bench/node_plan.py --samples 17000000 --repeats 3

Results: bench/results/node_plan.json.
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import cpu_name  # noqa: E402

from m3leo_stream.node_cache import EPOCH_STRIDE, NEVER, NodePlan, node_keys, node_ranks  # noqa: E402
from m3leo_stream.planner import PAD_FLAG, Catalog, EpochPlan, plan_train_epoch  # noqa: E402

REGIONS = ("asia", "china", "conus", "europe", "pakin", "sam")
SHARDS = 60_000
WORLD, RANK, BATCH = 64, 7, 8
EPOCHS = 3
KINDS = ("arrays", "mapped", "lists")


class ListNodePlan:
    """The same answers from per-row Python lists, learned by a Python loop over every read (the form NodePlan's
    arrays replace), for comparison."""

    def __init__(self, plan_for: Callable[[int], EpochPlan], position: Callable[[], tuple[int, int] | None],
                 rank: int, world_size: int, ranks: Sequence[int], first_epoch: int = 0):
        self._plan_for, self._position = plan_for, position
        self.last_epoch: int | None = None
        self.rank, self.world_size, self.ranks = rank, world_size, list(ranks)
        self._first_epoch = first_epoch
        self._uses: dict[int, list[int]] = {}
        self._mine: list[tuple[int, int]] = []
        self._known = -1
        self._kept_from = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        pos = self._position()
        return self._first_epoch * EPOCH_STRIDE if pos is None else pos[0] * EPOCH_STRIDE + pos[1]

    def _learn(self, upto: int) -> None:
        with self._lock:
            if self._known < 0:
                self._known = max(self._first_epoch, self.now() // EPOCH_STRIDE) - 1
            while self._known < upto:
                epoch = self._known + 1
                plan = self._plan_for(epoch)
                for g in range(plan.num_batches):
                    pos = epoch * EPOCH_STRIDE + g
                    for r in self.ranks:
                        for ref in plan.rank_batch(g, r, self.world_size):
                            if ref & PAD_FLAG:
                                continue
                            self._uses.setdefault(ref, []).append(pos)
                            if r == self.rank:
                                self._mine.append((pos, ref))
                self._known = epoch
            start = (self.now() // EPOCH_STRIDE) * EPOCH_STRIDE
            if self._mine and self._mine[0][0] < start:
                self._mine = self._mine[bisect.bisect_left(self._mine, (start, -1)):]
            if start > self._kept_from:
                self._uses = {r: kept for r, ps in self._uses.items()
                              if (kept := ps[bisect.bisect_left(ps, start):])}
                self._kept_from = start

    def next_use(self, row: int, after: int) -> float:
        self._learn(after // EPOCH_STRIDE + 1)
        uses = self._uses.get(row, ())
        i = bisect.bisect_left(uses, after)
        return uses[i] if i < len(uses) else NEVER

    def consume(self, row: int) -> None:
        after = self.now()
        self._learn(after // EPOCH_STRIDE + 1)
        with self._lock:
            uses = self._uses.get(row)
            if uses:
                i = bisect.bisect_left(uses, after)
                if i < len(uses):
                    del uses[i]

    def ahead(self, n: int) -> list[int]:
        now = self.now()
        self._learn(now // EPOCH_STRIDE + 1)
        with self._lock:
            i = bisect.bisect_left(self._mine, (now, -1))
            out: list[int] = []
            end = NEVER if self.last_epoch is None else (self.last_epoch + 1) * EPOCH_STRIDE
            for pos, row in self._mine[i:]:
                if len(out) >= n or pos >= end:
                    break
                uses = self._uses.get(row, ())
                j = bisect.bisect_left(uses, pos)
                if j < len(uses) and uses[j] == pos:
                    out.append(row)
            return out


def catalog(n: int) -> Catalog:
    """``n`` training rows in ``SHARDS`` shards of consecutive rows, the shards dealt to the regions in turn."""
    shard = (np.arange(n, dtype=np.int64) * SHARDS // n).astype(np.int32)
    return Catalog("train", REGIONS, np.arange(n, dtype=np.int64), (shard % len(REGIONS)).astype(np.int16), shard)


def _anon_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _median_s(fn: Callable[[], object], calls: int) -> float:
    """Median seconds of one call over 5 rounds of ``calls`` calls."""
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls)
    return statistics.median(rounds)


def child(kind: str, plans: str) -> None:
    """One rank's NodePlan of ``kind`` over the mapped plans in ``plans``: prints its figures as a JSON line."""
    import gc

    refs = {e: np.load(Path(plans) / f"e{e}.npy", mmap_mode="r") for e in range(EPOCHS)}
    gb = BATCH * WORLD
    clock: list[tuple[int, int] | None] = [None]
    ranks = node_ranks(RANK, WORLD, {"LOCAL_WORLD_SIZE": "8"})
    def share(epoch: int, build: Callable[[], np.ndarray]) -> np.ndarray:
        return np.load(Path(plans) / f"keys{epoch}.npy", mmap_mode="r")  # written by the parent, as by a node peer

    gc.collect()
    base = _anon_rss()
    plan: NodePlan | ListNodePlan
    if kind == "lists":
        plan = ListNodePlan(lambda e: EpochPlan(refs[e], gb), lambda: clock[0], RANK, WORLD, ranks)
    else:
        plan = NodePlan(lambda e: EpochPlan(refs[e], gb), lambda: clock[0], RANK, WORLD, ranks,
                        share=share if kind == "mapped" else None)
    t = time.perf_counter()
    plan.next_use(0, 0)  # learns epochs 0 and 1
    learn2_s = time.perf_counter() - t
    rss2 = _anon_rss() - base
    clock[0] = (1, 0)
    t = time.perf_counter()
    plan.next_use(0, EPOCH_STRIDE)  # learns epoch 2, forgets epoch 0
    learn1_s = time.perf_counter() - t
    gc.collect()
    rss = _anon_rss() - base
    nbytes = plan.nbytes if isinstance(plan, NodePlan) else None
    mapped = sum(e.keys.nbytes for e in plan._epochs) if kind == "mapped" else 0

    rng = np.random.default_rng(0)
    n_rows = len(refs[0])
    mine = EpochPlan(refs[1], gb)
    now = EPOCH_STRIDE
    probe = iter(int(r) for r in rng.integers(0, n_rows, 1 << 20))
    out = {"kind": kind, "learn_two_epochs_s": learn2_s, "learn_one_epoch_s": learn1_s,
           "anon_rss_two_epochs_bytes": rss2, "anon_rss_bytes": rss, "array_bytes": nbytes,
           "mapped_bytes": mapped, "node_bytes": 8 * rss + mapped,
           "next_use_us": 1e6 * _median_s(lambda: plan.next_use(next(probe), now), 2000),
           "ahead32_us": 1e6 * _median_s(lambda: plan.ahead(32), 500)}
    for held in (10_000, 100_000):
        rows = rng.choice(n_rows, held, replace=False)
        if isinstance(plan, NodePlan):
            out[f"next_uses_{held}_ms"] = 1e3 * _median_s(lambda rows=rows: plan.next_uses(rows, now), 3)

            def rank_arrays(rows: np.ndarray = rows) -> object:
                return np.lexsort((rows, plan.next_uses(rows, now)))[::-1]
            out[f"rank_{held}_ms"] = 1e3 * _median_s(rank_arrays, 3)
        else:
            listed = rows.tolist()
            out[f"next_uses_{held}_ms"] = 1e3 * _median_s(lambda listed=listed: [plan.next_use(r, now)
                                                                                  for r in listed], 3)

            def rank_lists(listed: list[int] = listed) -> object:
                return sorted(((plan.next_use(r, now), r) for r in listed), reverse=True)
            out[f"rank_{held}_ms"] = 1e3 * _median_s(rank_lists, 3)
    # the reader's consumes: this rank's batches of epoch 1 in order, the clock following
    batches = range(0, 200)
    t = time.perf_counter()
    reads = 0
    for g in batches:
        clock[0] = (1, g)
        for row in mine.rank_batch(g, RANK, WORLD):
            plan.consume(row)
            reads += 1
    out["consume_us"] = 1e6 * (time.perf_counter() - t) / reads
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=17_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench/results/node_plan.json"))
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PLANS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="node-plan-") as tmp:
        t = time.perf_counter()
        cat = catalog(args.samples)
        for e in range(EPOCHS):
            np.save(Path(tmp) / f"e{e}.npy", plan_train_epoch(cat, seed=0, epoch=e, global_batch=BATCH * WORLD).refs)
        plan_s = (time.perf_counter() - t) / EPOCHS
        del cat
        ranks = node_ranks(RANK, WORLD, {"LOCAL_WORLD_SIZE": "8"})
        for e in range(EPOCHS):  # the node's keys, as the first rank of the node publishes them
            np.save(Path(tmp) / f"keys{e}.npy", node_keys(EpochPlan(np.load(Path(tmp) / f"e{e}.npy"), BATCH * WORLD),
                                                          ranks, WORLD))
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for i in range(args.repeats):
            for kind in (KINDS if i % 2 == 0 else KINDS[::-1]):
                res = subprocess.run([sys.executable, __file__, "--child", kind, tmp], check=True,
                                     capture_output=True, text=True)
                runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"  {kind} run {i + 1}: {runs[kind][-1]}", file=sys.stderr, flush=True)
    med = {kind: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None
                  for k in rs[0] if k != "kind"} for kind, rs in runs.items()}
    reads = args.samples // (BATCH * WORLD) * BATCH * len(node_ranks(RANK, WORLD, {"LOCAL_WORLD_SIZE": "8"}))
    rows = [("learn the first two epochs, s", "learn_two_epochs_s", "{:.2f}"),
            ("learn one more epoch (one forgotten), s", "learn_one_epoch_s", "{:.2f}"),
            ("arrays held (two epochs), MB", "array_bytes", "{:.1f}"),
            ("anonymous RSS growth (two epochs), MB", "anon_rss_bytes", "{:.0f}"),
            ("node's keys mapped (once a node), MB", "mapped_bytes", "{:.0f}"),
            ("a node of 8 ranks (8 × anonymous + mapped), MB", "node_bytes", "{:.0f}"),
            ("next_use of one row, µs", "next_use_us", "{:.1f}"),
            ("ahead(32), µs", "ahead32_us", "{:.1f}"),
            ("consume, µs", "consume_us", "{:.1f}"),
            ("next uses of 10k rows, ms", "next_uses_10000_ms", "{:.1f}"),
            ("rank 10k held entries by next use, ms", "rank_10000_ms", "{:.1f}"),
            ("rank 100k held entries by next use, ms", "rank_100000_ms", "{:.1f}")]
    print(f"\n{args.samples:,} samples, rank {RANK} of {WORLD}, 8 ranks a node ({reads:,} node reads an epoch); "
          f"medians of {args.repeats} alternating runs; planning an epoch took {plan_s:.1f} s\n")
    print("| | NodePlan arrays | NodePlan, node's keys mapped | Python lists | lists / arrays |\n|---|---|---|---|---|")
    for label, key, fmt in rows:
        a, m, b = (med[kind][key] for kind in KINDS)
        scale = 1e-6 if key.endswith("bytes") else 1
        cells = [fmt.format(v * scale) if v is not None else "—" for v in (a, m, b)]
        ratio = f"{b / a:.1f}" if a and b else "—"
        print(f"| {label} | {' | '.join(cells)} | {ratio} |")
    result = {"samples": args.samples, "world_size": WORLD, "rank": RANK, "ranks_per_node": 8, "batch_size": BATCH,
              "node_reads_per_epoch": reads, "repeats": args.repeats, "plan_epoch_s": plan_s, "median": med,
              "runs": runs, "machine": {"cpu": cpu_name(), "python": platform.python_version()}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median": med}))


if __name__ == "__main__":
    main()
