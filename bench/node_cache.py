"""The node-local cache (m3leo_stream/node_cache.py) against S3 at realistic latency, side by side in one run.

moto_server on loopback behind tests/net_faults.py's proxy, which holds back each response's first byte for
``--first-byte-ms`` (30) and caps every connection at ``--mb-per-s`` (100 MB/s). On shards built from
``m3leo-shards synth`` data (srtmdem + esawc, ≈ 1 MB per sample):

  1. throughput of the first epoch: the DataModule with the cache (cold) and without one, each against the proxy's
     own ceiling: the same byte ranges (the cache's entries) fetched by plain ranged GETs on as many threads as that
     loader has requests in flight (``ShardDataset.requests_in_flight``: ``io_threads``, and as many again for the
     cache's prefetcher). Each loader is connected before it is timed, as the ceiling's client is, and reads epoch 0
     alone (no read-ahead into epoch 1 and no prefetch of it overlaps what is timed next). A second ceiling for the
     cold cache writes each GET's bytes to a new file, as a disk cache must; CPU seconds per MB of this process
     are printed beside each (the cache's writes are system time);
  2. the second epoch with a cache that holds all the data: GETs and bytes the proxy forwarded (goal: 0);
  3. a cache of half the data over ``--epochs`` epochs: payload bytes fetched from S3 by the cache (evicting by
     next use in the plan), next to an LRU cache and the next-use optimum (Belady with bypass) of the same budget on
     the same access sequence (both simulated on the accesses the cache served, in plan order).

    python bench/node_cache.py --chips-per-region 120 --epochs 3 --repeats 3

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
from m3leo_stream.storage import connection_pool  # noqa: E402
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

    def _stats(self) -> tuple[int, int]:
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
            conn.send((proxy.gets, proxy.bytes_out))
    proxy.close()


def datamodule(url: str, proxy: ProxyProcess, cache_dir: Path, cache_bytes: int, args) -> M3LEODataModule:
    dm = M3LEODataModule(url, inputs=MODS[:1], targets=MODS[1:], batch_size=args.batch, num_workers=args.workers,
                         io_threads=args.io_threads, storage_options={"endpoint_url": proxy.url},
                         cache_dir=str(cache_dir), cache_bytes=cache_bytes, transforms=None)
    dm.setup()
    return dm


def reader_of(loader):
    return getattr(loader.dataset, "dataset", loader.dataset)


def warm(loader, path: str) -> None:
    """Open the loader's storage client (its session and a connection) before timing, as the ceiling's is, and
    learn the node's plan of the epoch (0.2 s at 17M samples, once an epoch: here it would be a share of a
    1-second epoch)."""
    reader_of(loader)._state()["fs"].info(path)
    if reader_of(loader).node_plan is not None:
        reader_of(loader).node_plan.next_use(0, 0)


def cpu_s() -> float:
    """CPU seconds of this process (user and system: the cache's writes are system time)."""
    t = os.times()
    return t.user + t.system


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


def ceiling(url: str, proxy: ProxyProcess, requests: list[tuple[str, int, int]], threads: int,
            write_to: Path | None = None) -> tuple[float, float]:
    """Seconds and CPU seconds for plain ranged GETs of ``requests`` through the proxy on ``threads`` threads; with
    ``write_to``, each also written to a new file there (what a disk cache must do with every byte it fetches)."""
    import s3fs

    opts = connection_pool(url, {"endpoint_url": proxy.url}, threads)  # as many connections as the loader's
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.cat_file(requests[0][0], start=0, end=1)  # connect once, as a warm loader has

    def get(r: tuple[str, int, int]) -> int:
        data = fs.cat_file(r[0], start=r[1], end=r[2])
        if write_to is not None:
            (write_to / f"{Path(r[0]).name}-{r[1]}").write_bytes(data)
        return len(data)

    if write_to is not None:
        write_to.mkdir(parents=True)
    t, c = time.perf_counter(), cpu_s()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(get, requests))
    assert got == sum(r[2] - r[1] for r in requests)
    return time.perf_counter() - t, cpu_s() - c


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
    ap.add_argument("--chips-per-region", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--io-threads", type=int, default=None, help="default: the reader's for object stores")
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

        res: dict = {"config": vars(args), "samples": len(epoch0), "epoch_bytes": epoch_bytes,
                     "distinct_bytes": total}

        def one_epoch(cache_bytes: int, name: str) -> tuple[float, float, dict, object]:
            """Seconds and CPU seconds of epoch 0 read by a new loader (connected first, as the ceiling's client
            is), with the GETs, bytes forwarded and most GETs in flight the proxy saw."""
            ld = datamodule(url, proxy, tmp / name, cache_bytes, args).train_dataloader()
            warm(ld, reqs[0][0])
            this_epoch_only(ld, 0)
            gets, nbytes = proxy.gets, proxy.bytes_out
            proxy.max_in_flight()
            c = cpu_s()
            t = run_epoch(ld, 0)
            settle(ld)
            cpu = cpu_s() - c
            cache = reader_of(ld).cache()
            seen = {"gets": proxy.gets - gets, "bytes_from_s3": proxy.bytes_out - nbytes,
                    "max_in_flight": proxy.max_in_flight(), "cache": cache.stats.as_dict() if cache else None}
            return t, cpu, seen, ld

        in_flight = {"cold": ds.requests_in_flight(), "none": ds.io_threads()}
        runs: dict[str, list[float]] = {"ceiling_cold": [], "ceiling_write": [], "ceiling_none": [], "none": [],
                                        "cold": []}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        seen: dict[str, dict] = {}
        ld_full = None
        for i in range(args.repeats):  # alternating, medians reported: the machine is shared
            t, c = ceiling(url, proxy, reqs, in_flight["cold"], write_to=tmp / f"written{i}")
            runs["ceiling_write"].append(t)
            cpu["ceiling_write"].append(c)
            for kind in ("cold", "none"):
                t, c = ceiling(url, proxy, reqs, in_flight[kind])
                runs[f"ceiling_{kind}"].append(t)
                cpu[f"ceiling_{kind}"].append(c)
                if ld_full is not None and kind == "cold":
                    reader_of(ld_full).cache().close()
                t, c, seen[kind], ld = one_epoch(4 * total if kind == "cold" else 0, f"c-{kind}{i}")
                runs[kind].append(t)
                cpu[kind].append(c)
                if kind == "cold":
                    ld_full = ld
        med = {k: statistics.median(v) for k, v in runs.items()}
        ms_mb = {k: statistics.median(v) * 1e3 / (epoch_bytes / 1e6) for k, v in cpu.items()}
        res["runs_s"], res["cpu_s"] = runs, cpu
        res["throughput"] = {kind: {
            "requests_in_flight": in_flight[kind], "MBps": epoch_bytes / med[kind] / 1e6,
            "ceiling_MBps": epoch_bytes / med[f"ceiling_{kind}"] / 1e6,
            "vs_ceiling": med[f"ceiling_{kind}"] / med[kind], "ceiling_gets": len(reqs),
            "cpu_ms_per_MB": ms_mb[kind], "ceiling_cpu_ms_per_MB": ms_mb[f"ceiling_{kind}"], **seen[kind],
        } for kind in ("cold", "none")}
        res["throughput"]["cold"].update({
            "ceiling_write_MBps": epoch_bytes / med["ceiling_write"] / 1e6,
            "vs_ceiling_write": med["ceiling_write"] / med["cold"],
            "ceiling_write_cpu_ms_per_MB": ms_mb["ceiling_write"]})

        # epoch 2 with the data held
        g, b, hits = proxy.gets, proxy.bytes_out, reader_of(ld_full).cache().stats.hits
        t_warm = run_epoch(ld_full, 1)
        res["epoch2_full_cache"] = {"gets": proxy.gets - g, "bytes_from_s3": proxy.bytes_out - b,
                                    "seconds": t_warm, "MBps": epoch_bytes / t_warm / 1e6,
                                    "hits": reader_of(ld_full).cache().stats.hits - hits}
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
        fetched = cache.stats.fetched_bytes  # on demand and ahead, read ahead into the next epoch included
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
    c, n = t["cold"], t["none"]
    lines = [
        f"S3 through the proxy: {args.first_byte_ms:.0f} ms first byte, {args.mb_per_s:.0f} MB/s per connection; "
        f"{res['samples']} samples/epoch, {res['epoch_bytes'] / 1e6:.1f} MB/epoch, batch {args.batch}, "
        f"{args.workers} reader threads, io_threads {n['requests_in_flight']}; medians of {args.repeats} "
        "alternating runs; the ceiling: the same byte ranges by plain ranged GETs on as many threads as the loader "
        "has requests in flight",
        "",
        f"{'epoch 1 (cold)':<40}{'MB/s':>8}{'x ceiling':>11}{'GETs':>7}{'max in flight':>15}"
        f"{'CPU ms/MB':>11}",
        f"{'ceiling, ' + str(c['requests_in_flight']) + ' threads':<40}{c['ceiling_MBps']:8.1f}{1.0:11.2f}"
        f"{c['ceiling_gets']:7d}{'':>15}{c['ceiling_cpu_ms_per_MB']:11.1f}",
        f"{'  the same, each written to a file':<40}{c['ceiling_write_MBps']:8.1f}"
        f"{c['ceiling_write_MBps'] / c['ceiling_MBps']:11.2f}{c['ceiling_gets']:7d}{'':>15}"
        f"{c['ceiling_write_cpu_ms_per_MB']:11.1f}",
        f"{'m3leo, cache (cold), ' + str(c['requests_in_flight']) + ' in flight':<40}{c['MBps']:8.1f}"
        f"{c['vs_ceiling']:11.2f}{c['gets']:7d}{c['max_in_flight']:15d}{c['cpu_ms_per_MB']:11.1f}",
        f"{'  × the ceiling with writes':<40}{'':>8}{c['vs_ceiling_write']:11.2f}",
        f"{'ceiling, ' + str(n['requests_in_flight']) + ' threads':<40}{n['ceiling_MBps']:8.1f}{1.0:11.2f}"
        f"{n['ceiling_gets']:7d}{'':>15}{n['ceiling_cpu_ms_per_MB']:11.1f}",
        f"{'m3leo, no cache, ' + str(n['requests_in_flight']) + ' in flight':<40}{n['MBps']:8.1f}"
        f"{n['vs_ceiling']:11.2f}{n['gets']:7d}{n['max_in_flight']:15d}{n['cpu_ms_per_MB']:11.1f}",
        f"  (cold cache: {c['cache']['prefetched']} of {c['cache']['fetched']} entries fetched ahead, "
        f"{c['cache']['waited']} reads waited for a fetch under way; CPU: this process, user and system)",
        "",
        f"epoch 2, cache holding the data: {w['gets']} GETs, {w['bytes_from_s3']} bytes from S3, "
        f"{w['MBps']:.1f} MB/s ({w['hits']} hits)",
        "",
        f"cache of half the data ({h['budget'] / 1e6:.1f} MB), {h['epochs']} epochs "
        f"and {h['read_ahead_into_next_epoch']} samples read ahead into the next "
        f"({h['accesses_bytes'] / 1e6:.1f} MB read by the plan):",
        f"  {'next use (this cache, measured)':<36}{h['next_use_cache_bytes'] / 1e6:9.1f} MB from S3 "
        f"({h['proxy_bytes_out'] / 1e6:.1f} MB through the proxy, headers and listings included)",
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
