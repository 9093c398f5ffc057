"""The node-local cache (m3leo_stream/node_cache.py) against S3 at realistic latency, side by side in one run.

moto_server on loopback behind tests/net_faults.py's proxy, which holds back each response's first byte for
``--first-byte-ms`` (30) and caps every connection at ``--mb-per-s`` (100 MB/s). On shards built from
``m3leo-shards synth`` data (srtmdem + esawc, ≈ 1 MB per sample):

  1. throughput of the first epoch: the DataModule with the cache (cold) and without one, against the proxy's own
     ceiling: the same byte ranges (the cache's entries) fetched by plain ranged GETs on as many threads as the
     loader can have GETs in flight (``io_threads`` for batches + ``io_threads`` for the prefetcher);
  2. the second epoch with a cache that holds all the data: GETs and bytes the proxy forwarded (goal: 0);
  3. a cache of half the data over ``--epochs`` epochs: payload bytes fetched from S3 by the cache (evicting by
     next use in the plan), next to an LRU cache and the next-use optimum (Belady with bypass) of the same budget on
     the same access sequence (both simulated on the accesses the cache served, in plan order).

    python bench/node_cache.py --chips-per-region 40 --epochs 3 --repeats 3

Results: bench/results/node_cache.json and .txt. The data lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from loader import start_moto  # noqa: E402
from net_faults import FaultyProxy  # noqa: E402

from m3leo_stream.datamodule import M3LEODataModule  # noqa: E402
from m3leo_stream.reader import _Entries  # noqa: E402
from shard_tools.build import BuildConfig, build  # noqa: E402
from shard_tools.synth import SynthConfig, synth  # noqa: E402

MODS = ["srtmdem", "esawc"]


class ProxyProcess:
    """The proxy in a process of its own (its pumping threads must not share the loader's interpreter lock), with
    its counters read over a pipe."""

    def __init__(self, target_port: int, first_byte_s: float, bandwidth: float):
        self._conn, child = mp.Pipe()
        self._proc = mp.get_context("spawn").Process(target=_serve_proxy, args=(child, target_port, first_byte_s,
                                                                              bandwidth), daemon=True)
        self._proc.start()
        self.url = self._conn.recv()

    def _stats(self) -> tuple[int, int, int]:
        self._conn.send("stats")
        return self._conn.recv()

    @property
    def gets(self) -> int:
        return self._stats()[0]

    @property
    def bytes_out(self) -> int:
        return self._stats()[1]

    def max_in_flight(self) -> int:
        """The most GETs in flight at once since the last call."""
        self._conn.send("max")
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send("close")
        self._proc.join(10)


def _serve_proxy(conn, target_port: int, first_byte_s: float, bandwidth: float) -> None:
    proxy = FaultyProxy(target_port, first_byte_s=first_byte_s, bandwidth=bandwidth)
    conn.send(proxy.url)
    while (cmd := conn.recv()) in ("stats", "max"):
        if cmd == "max":
            conn.send(proxy.max_in_flight)
            proxy.reset_max_in_flight()
        else:
            conn.send((proxy.gets, proxy.bytes_out, proxy.in_flight))
    proxy.close()


def datamodule(url: str, proxy: ProxyProcess, cache_dir: Path, cache_bytes: int, args) -> M3LEODataModule:
    dm = M3LEODataModule(url, inputs=MODS[:1], targets=MODS[1:], batch_size=args.batch, num_workers=args.workers,
                         io_threads=args.io_threads, storage_options={"endpoint_url": proxy.url},
                         cache_dir=str(cache_dir), cache_bytes=cache_bytes, transforms=None)
    dm.setup()
    return dm


def reader_of(loader):
    return getattr(loader.dataset, "dataset", loader.dataset)


def run_epoch(loader, epoch: int) -> float:
    loader.batch_sampler.set_epoch(epoch)
    t = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t


def this_epoch_only(loader, epoch: int) -> None:
    """Read (and prefetch) nothing past ``epoch``: the loader then fetches the same bytes as the ceiling."""
    loader.dataset.next_epoch = False
    if reader_of(loader).node_plan is not None:
        reader_of(loader).node_plan.last_epoch = epoch


def settle(loader) -> None:
    """Wait for the loader's reads ahead and the cache's prefetches to end, so that none overlaps what is timed
    next."""
    for _, fut in list(getattr(loader.dataset, "_pending", {}).values()):
        fut.cancel()
        try:
            fut.result()
        except BaseException:  # noqa: BLE001 - cancelled, or failed: either way it is over
            pass
    cache = reader_of(loader).cache()
    while cache is not None and cache._pending:
        time.sleep(0.01)


def ceiling(url: str, proxy: ProxyProcess, requests: list[tuple[str, int, int]], threads: int) -> float:
    """Seconds for plain ranged GETs of ``requests`` through the proxy on ``threads`` threads."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True)
    fs.cat_file(requests[0][0], start=0, end=1)  # connect once, as a warm loader has

    def get(r: tuple[str, int, int]) -> int:
        return len(fs.cat_file(r[0], start=r[1], end=r[2]))

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(get, requests))
    assert got == sum(r[2] - r[1] for r in requests)
    return time.perf_counter() - t


def simulate(seq: list[int], size: dict[int, int], budget: int, policy: str) -> int:
    """Bytes fetched by a cache of ``budget`` bytes on the access sequence ``seq``: ``lru``, or ``next_use`` (the
    optimum when the future is known: evict the entry needed farthest ahead, keep nothing needed later than all)."""
    uses: dict[int, list[int]] = {}
    for t, r in enumerate(seq):
        uses.setdefault(r, []).append(t)
    nxt = {r: 0 for r in uses}  # index into uses[r] of the next use
    held: OrderedDict[int, int] = OrderedDict()
    fetched = 0
    for t, r in enumerate(seq):
        nxt[r] += 1
        if r in held:
            held.move_to_end(r)
            continue
        fetched += size[r]
        used = sum(held.values())
        if policy == "lru":
            while held and used + size[r] > budget:
                used -= held.popitem(last=False)[1]
            if used + size[r] <= budget:
                held[r] = size[r]
            continue
        never = len(seq)

        def next_of(x: int) -> int:
            return uses[x][nxt[x]] if nxt[x] < len(uses[x]) else never

        mine = next_of(r)
        for victim in sorted(held, key=next_of, reverse=True):
            if used + size[r] <= budget or next_of(victim) <= mine:
                break
            used -= held.pop(victim)
        if used + size[r] <= budget and mine < never:
            held[r] = size[r]
    return fetched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips-per-region", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--first-byte-ms", type=float, default=30.0)
    ap.add_argument("--mb-per-s", type=float, default=100.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "node_cache"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="m3leo-bench-cache-"))
    moto, endpoint = start_moto()
    proxy = None
    try:
        src, shards = tmp / "src", tmp / "shards"
        synth(SynthConfig(str(src), regions=("conus", "europe"), chips_per_region=args.chips_per_region, seed=0,
                          modalities=tuple(MODS)), progress=False)
        build(BuildConfig(str(src), str(shards), shard_size=20_000_000, workers=1, progress=False))
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("bench")
        fs.put(str(shards), "bench/shards", recursive=True)
        url = "s3://bench/shards"
        proxy = ProxyProcess(int(endpoint.rsplit(":", 1)[1]), first_byte_s=args.first_byte_ms / 1e3,
                             bandwidth=args.mb_per_s * 1e6)

        # the entries of epoch 0, and the plan's access sequence over all epochs
        dm = datamodule(url, proxy, tmp / "c-plan", 1, args)
        loader = dm.train_dataloader()
        ds = reader_of(loader)
        entries = _Entries(ds)
        seq = []
        for e in range(args.epochs):
            plan = loader.batch_sampler.plan_for(e)
            seq += [int(r) for r in plan.refs]
        size = {r: entries.entry_size(r) for r in set(seq)}
        total = sum(size.values())
        epoch0 = [int(r) for r in loader.batch_sampler.plan_for(0).refs]
        reqs = [(f"bench/shards/{ds.index.shard_names[q.shard]}", q.start, q.stop)
                for r in epoch0 for q in entries._task(r)]
        epoch_bytes = sum(size[r] for r in epoch0)
        threads = 2 * args.io_threads

        res: dict = {"config": vars(args), "samples": len(epoch0), "epoch_bytes": epoch_bytes,
                     "distinct_bytes": total, "ceiling_threads": threads}
        def one_epoch(cache_bytes: int, name: str) -> tuple[float, int, object]:
            ld = datamodule(url, proxy, tmp / name, cache_bytes, args).train_dataloader()
            gets = proxy.gets
            return run_epoch(ld, 0), proxy.gets - gets, ld

        runs: dict[str, list[float]] = {"ceiling": [], "none": [], "cold": []}
        ld_full = None
        for i in range(args.repeats):  # alternating, medians reported: the machine is shared
            runs["ceiling"].append(ceiling(url, proxy, reqs, threads))
            runs["none"].append(one_epoch(0, f"c-none{i}")[0])
            if ld_full is not None:
                reader_of(ld_full).cache().close()
            t, gets_cold, ld_full = one_epoch(4 * total, f"c-full{i}")
            runs["cold"].append(t)
        t_ceiling, t_nocache, t_cold = (statistics.median(runs[k]) for k in ("ceiling", "none", "cold"))
        res["runs_s"] = runs
        res["throughput"] = {
            "ceiling_MBps": epoch_bytes / t_ceiling / 1e6, "cache_cold_MBps": epoch_bytes / t_cold / 1e6,
            "no_cache_MBps": epoch_bytes / t_nocache / 1e6, "cache_cold_vs_ceiling": t_ceiling / t_cold,
            "no_cache_vs_ceiling": t_ceiling / t_nocache, "cache_cold_gets": gets_cold, "ceiling_gets": len(reqs),
        }

        # epoch 2 with the data held
        g, b = proxy.gets, proxy.bytes_out
        t_warm = run_epoch(ld_full, 1)
        res["epoch2_full_cache"] = {"gets": proxy.gets - g, "bytes_from_s3": proxy.bytes_out - b,
                                    "seconds": t_warm, "MBps": epoch_bytes / t_warm / 1e6,
                                    "hits": reader_of(ld_full).cache().stats.hits}
        reader_of(ld_full).cache().close()

        # half the data
        budget = total // 2
        d = datamodule(url, proxy, tmp / "c-half", budget, args)
        ld = d.train_dataloader()
        reader_of(ld).node_plan.last_epoch = args.epochs - 1  # the run ends there: nothing of the next is prefetched
        cache = reader_of(ld).cache()
        served: list[int] = []  # the accesses as they reach the cache (read-ahead at epoch ends included)
        get = cache.get
        cache.get = lambda row, counters: served.append(row) or get(row, counters)  # type: ignore[method-assign]
        b = proxy.bytes_out  # the setup's reads are done
        for e in range(args.epochs):
            run_epoch(ld, e)
        cache.close()
        fetched = int(d.loader_metrics()["bytes"]) + cache.io.bytes
        # the loader reads on into the next epoch's first batches (read ahead, never consumed): the simulations take
        # the accesses the cache served, in plan order (threads serve them in an order of their own)
        extra = len(served) - len(seq)
        seq_run = seq + [int(r) for r in loader.batch_sampler.plan_for(args.epochs).refs[:max(0, extra)]]
        if Counter(seq_run) != Counter(int(r) for r in served):
            raise RuntimeError("the cache served other samples than the plan's: the simulations would not compare")
        size.update({r: entries.entry_size(r) for r in seq_run if r not in size})
        res["half_cache"] = {
            "budget": budget, "epochs": args.epochs, "read_ahead_into_next_epoch": extra,
            "accesses_bytes": sum(size[r] for r in seq_run),
            "next_use_cache_bytes": fetched, "proxy_bytes_out": proxy.bytes_out - b,
            "lru_simulated_bytes": simulate(seq_run, size, budget, "lru"),
            "next_use_optimum_bytes": simulate(seq_run, size, budget, "next_use"),
            "stats": cache.stats.as_dict(),
        }
        h = res["half_cache"]
        h["vs_optimum"] = h["next_use_cache_bytes"] / h["next_use_optimum_bytes"]
        h["vs_lru"] = h["next_use_cache_bytes"] / h["lru_simulated_bytes"]
    finally:
        if proxy is not None:
            proxy.close()
        moto.terminate()
        moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    t, w, h = res["throughput"], res["epoch2_full_cache"], res["half_cache"]
    lines = [
        f"S3 through the proxy: {args.first_byte_ms:.0f} ms first byte, {args.mb_per_s:.0f} MB/s per connection; "
        f"{res['samples']} samples/epoch, {res['epoch_bytes'] / 1e6:.1f} MB/epoch, batch {args.batch}, "
        f"{args.workers} reader threads, io_threads {args.io_threads}; medians of {args.repeats} alternating runs",
        "",
        f"{'epoch 1 (cold)':<34}{'MB/s':>8}{'x ceiling':>11}{'GETs':>7}",
        f"{'ceiling: ranged GETs, ' + str(threads) + ' threads':<34}{t['ceiling_MBps']:8.1f}{1.0:11.2f}"
        f"{t['ceiling_gets']:7d}",
        f"{'m3leo, cache (cold)':<34}{t['cache_cold_MBps']:8.1f}{t['cache_cold_vs_ceiling']:11.2f}"
        f"{t['cache_cold_gets']:7d}",
        f"{'m3leo, no cache':<34}{t['no_cache_MBps']:8.1f}{t['no_cache_vs_ceiling']:11.2f}",
        "",
        f"epoch 2, cache holding the data: {w['gets']} GETs, {w['bytes_from_s3']} bytes from S3, "
        f"{w['MBps']:.1f} MB/s ({w['hits']} hits)",
        "",
        f"cache of half the data ({h['budget'] / 1e6:.1f} MB), {h['epochs']} epochs "
        f"and {h['read_ahead_into_next_epoch']} samples read ahead into the next "
        f"({h['accesses_bytes'] / 1e6:.1f} MB read by the plan):",
        f"  {'next use (this cache, measured)':<36}{h['next_use_cache_bytes'] / 1e6:9.1f} MB from S3",
        f"  {'LRU (simulated, same plan)':<36}{h['lru_simulated_bytes'] / 1e6:9.1f} MB",
        f"  {'next-use optimum (simulated)':<36}{h['next_use_optimum_bytes'] / 1e6:9.1f} MB",
        f"  this cache / optimum = {h['vs_optimum']:.3f}; / LRU = {h['vs_lru']:.3f}",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    main()
