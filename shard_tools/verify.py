"""``m3leo-shards verify`` and ``stats``: check a shard root end to end, recompute its statistics; both split into
array tasks (``--task-index/--num-tasks``, contiguous shares of the manifest's shards) and a merge step, and both
stream the index by row groups."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3leo_stream import shard_format as sf
from m3leo_stream.shard_root import ShardRoot
from m3leo_stream.storage import join
from shard_tools.inflight import bounded_map
from shard_tools.publish import pipe_atomic, staged
from shard_tools.stats import StatsSet

log = logging.getLogger(__name__)


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_shard(root: ShardRoot, entry: Mapping[str, Any], rows: list[dict[str, Any]],
                 modalities: Mapping[str, Any], checksums: bool) -> list[str]:
    problems: list[str] = []
    path = entry["path"]
    full = root.file(path)
    if not root.fs.exists(full):
        return [f"{path}: listed in the manifest but missing"]
    members: dict[str, tuple[int, int]] = {}
    digests: dict[str, int] = {}  # member → its digest
    chunks: dict[str, bytes] = {}  # array member → the chunk digests its bytes give
    stored: dict[str, bytes] = {}  # array member → its chunk-digest member
    decoded: list[str] = []
    with root.fs.open(full, "rb") as f:
        reader = _HashingReader(f)
        try:
            # typeshed asks any fileobj for write/seek/tell/close; a stream read ("r|") only reads
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for ti in tar:
                    members[ti.name] = (ti.offset_data, ti.size)
                    data = tar.extractfile(ti).read() if ti.isfile() else b""
                    digests[ti.name] = sf.digest(data)
                    parts = ti.name.split(".")
                    if len(parts) == 3 and parts[1] in modalities and parts[2] == "xxh3":
                        stored[f"{parts[0]}.{parts[1]}.npy"] = data
                    elif len(parts) >= 3 and parts[1] in modalities:
                        m = modalities[parts[1]]
                        if not ti.name.endswith(".zst"):
                            try:
                                start = sf.npy_header(data)[3]
                                chunks[ti.name] = sf.chunk_digests(data[:start], memoryview(data)[start:],
                                                                   m["shape"][0])
                            except sf.FormatError:
                                pass  # the decode below says what is wrong
                        try:
                            arr = sf.decode_array(data, compressed=ti.name.endswith(".zst"), where=f"{path}:{ti.name}")
                        except sf.FormatError as e:
                            decoded.append(str(e))
                            continue
                        if tuple(arr.shape) != tuple(m["shape"]) or arr.dtype.name != m["dtype"]:
                            decoded.append(f"{path}:{ti.name}: array {arr.shape} {arr.dtype}, manifest says "
                                           f"{tuple(m['shape'])} {m['dtype']}")
        except tarfile.TarError as e:
            problems.append(f"{path}: not a readable tar ({e})")
        reader.drain()
    problems += decoded
    if reader.n != entry["bytes"]:
        problems.append(f"{path}: {reader.n} bytes, manifest says {entry['bytes']}")
    if reader.sha.hexdigest() != entry["sha256"]:
        problems.append(f"{path}: sha256 {reader.sha.hexdigest()} differs from the manifest's {entry['sha256']}")
    keys = {r["key"] for r in rows}
    if len(rows) != entry["num_samples"]:
        problems.append(f"{path}: index has {len(rows)} samples, manifest says {entry['num_samples']}")
    json_members = {n for n in members if n.endswith(".json")}
    if len(json_members) != entry["num_samples"]:
        problems.append(f"{path}: tar holds {len(json_members)} samples, manifest says {entry['num_samples']}")
    for name in sorted(json_members):
        if name[: -len(".json")] not in keys:
            problems.append(f"{path}: member {name} has no index row")
    ext = ".npy.zst" if root.compressed else ".npy"
    for r in rows:
        for mod in [sf.JSON_MEMBER, *modalities]:
            off, n = r.get(sf.offset_column(mod)), r.get(sf.nbytes_column(mod))
            name = f"{r['key']}.json" if mod == sf.JSON_MEMBER else f"{r['key']}.{mod}{ext}"
            if off is None:
                if name in members:
                    problems.append(f"{path}: member {name} exists but the index has no range for it")
                continue
            if name not in members:
                problems.append(f"{path}: index range for {name} but no such member")
                continue
            if members[name] != (off, n):
                problems.append(f"{path}: index range of {name} is ({off}, {n}), tar member is at {members[name]}")
            if checksums:
                problems += _check_digests(path, name, r, mod, digests[name], chunks.get(name), stored.get(name))
    return problems


def _check_digests(path: str, name: str, row: Mapping[str, Any], member: str, found: int,
                   chunks: bytes | None, stored: bytes | None) -> list[str]:
    """The member's digest in the index against that of its bytes in the tar; for uncompressed arrays, also its
    chunk-digest member against the chunks of its bytes and against the index."""
    want = row.get(sf.checksum_column(member))
    if want != found:
        return [f"{path}: member {name} hashes to {found:016x}, the index says "
                f"{'nothing' if want is None else f'{want:016x}'}"]
    if chunks is None:
        return []
    if stored is None:
        return [f"{path}: member {name} has no chunk-digest member before it"]
    if stored != chunks:
        n = min(len(stored), len(chunks)) // 8
        bad = next((i for i in range(n) if stored[8 * i:8 * i + 8] != chunks[8 * i:8 * i + 8]), n)
        what = ".npy header" if bad == 0 else f"band {bad - 1}"
        return [f"{path}: member {name}: the digest of its {what} differs from its chunk-digest member"]
    if row.get(sf.chunks_checksum_column(member)) != sf.digest(stored):
        return [f"{path}: member {name}: its chunk-digest member does not hash to the index's "
                f"{sf.chunks_checksum_column(member)}"]
    return []


def share(n: int, task_index: int, num_tasks: int) -> range:
    """Task ``task_index``'s contiguous share of ``n`` items (contiguous, so that it reads few index row groups)."""
    if not (0 <= task_index < num_tasks):
        raise ValueError(f"--task-index {task_index} is outside 0..{num_tasks - 1}")
    return range(n * task_index // num_tasks, n * (task_index + 1) // num_tasks)


class IndexScan:
    """One pass over the index's ``shard`` column (dictionary-encoded: about a byte a row): rows and row groups of
    every shard, without reading the other columns."""

    def __init__(self, root: ShardRoot):
        import pyarrow.parquet as pq

        self.root = root
        self.rows: Counter = Counter()
        self.groups: dict[str, list[int]] = {}  # shard → [first row group, last row group]
        with root.fs.open(root.file(sf.INDEX), "rb") as f:
            pf = pq.ParquetFile(f)
            self.num_row_groups = pf.num_row_groups
            self.num_rows = pf.metadata.num_rows
            for g in range(pf.num_row_groups):
                col = pf.read_row_group(g, columns=["shard"]).column("shard").combine_chunks().dictionary_encode()
                counts = np.bincount(col.indices.to_numpy(zero_copy_only=False), minlength=len(col.dictionary))
                for name, n in zip(col.dictionary.to_pylist(), counts.tolist()):
                    if n:
                        self.rows[name] += n
                        self.groups.setdefault(name, [g, g])[1] = g

    def rows_of(self, shards: Sequence[str], columns: Sequence[str] | None = None,
                batch_size: int = 4096) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """``(shard, its index rows)`` for each of ``shards`` (in the order they complete), reading only the row
        groups that hold them, a batch at a time; a shard is yielded as soon as its last row is read, so that the
        rows held are those of one batch and of the shards it ends."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        wanted = set(shards)
        done_after: dict[int, list[str]] = {}
        for s in shards:
            if s in self.groups:
                done_after.setdefault(self.groups[s][1], []).append(s)
            else:
                yield s, []
        groups = sorted({g for s in wanted if s in self.groups for g in range(self.groups[s][0],
                                                                             self.groups[s][1] + 1)})
        value_set = pa.array(sorted(wanted), pa.string())
        pending: dict[str, list[dict[str, Any]]] = {}
        with self.root.fs.open(self.root.file(sf.INDEX), "rb") as f:
            pf = pq.ParquetFile(f)
            for g in groups:
                for b in pf.iter_batches(batch_size=batch_size, row_groups=[g], columns=columns):
                    b = b.filter(pc.is_in(b.column("shard"), value_set=value_set))
                    for r in b.to_pylist():
                        rows = pending.setdefault(r["shard"], [])
                        rows.append(r)
                        if len(rows) == self.rows[r["shard"]]:
                            yield r["shard"], pending.pop(r["shard"])
                for s in done_after.pop(g, []):
                    if s in pending:  # fewer rows than the scan counted: the index changed between the passes
                        yield s, pending.pop(s)


def _key_hashes(root: ShardRoot) -> list[np.ndarray]:
    from shard_tools.finalize import iter_batches, key_hashes

    with root.fs.open(root.file(sf.INDEX), "rb") as f:
        import pyarrow.parquet as pq

        return [key_hashes(b.column("region"), b.column("key"))
                for b in iter_batches(pq.ParquetFile(f), columns=["region", "key"])]


def _global_problems(root: ShardRoot, scan: IndexScan) -> list[str]:
    """The checks over the whole root: index shards and tar files against the manifest, row count, duplicate keys
    (by 64-bit digests of (region, key), confirmed on the keys: 8 bytes a sample)."""
    import pyarrow.parquet as pq

    from shard_tools.finalize import duplicate_keys, iter_batches, repeated

    manifest = root.manifest
    problems: list[str] = []
    listed = {s["path"] for s in manifest["shards"]}
    for s in sorted(set(scan.rows) - listed):
        problems.append(f"{s}: in the index but not in the manifest")
    on_disk = {p[len(root.path) + 1:] for p in root.fs.glob(root.file("*/*/*.tar"))}
    for s in sorted(on_disk - listed):
        problems.append(f"{s}: tar file not listed in the manifest")
    if scan.num_rows != manifest.get("num_samples", scan.num_rows):
        problems.append(f"index has {scan.num_rows} rows, manifest says {manifest['num_samples']}")
    suspects = repeated(_key_hashes(root))
    if len(suspects):
        with root.fs.open(root.file(sf.INDEX), "rb") as f:
            dup = duplicate_keys(iter_batches(pq.ParquetFile(f), columns=["region", "key"]), suspects)
        if dup:
            problems.append(f"index has {_duplicate_rows(root, set(dup))} duplicate keys")
    return problems


def _duplicate_rows(root: ShardRoot, dup: set[tuple[str, str]]) -> int:
    """Rows beyond the first of each duplicated (region, key), as the count of the earlier whole-index check."""
    import pyarrow.parquet as pq

    from shard_tools.finalize import iter_batches

    seen: Counter = Counter()
    with root.fs.open(root.file(sf.INDEX), "rb") as f:
        for b in iter_batches(pq.ParquetFile(f), columns=["region", "key"]):
            for r, k in zip(b.column("region").to_pylist(), b.column("key").to_pylist()):
                if (r, k) in dup:
                    seen[(r, k)] += 1
    return sum(n - 1 for n in seen.values())


def _result_path(root: ShardRoot, results: str | None, what: str, task_index: int, num_tasks: int) -> str:
    base = results or root.file(f"_build/{what}")
    return join(base, f"task-{task_index:05d}-of-{num_tasks:05d}.{'jsonl' if what == 'stats' else 'json'}")


def verify(out: str, storage_options: Mapping[str, Any] | None = None, workers: int = 4,
           progress: bool = True, task_index: int = 0, num_tasks: int = 1,
           results: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """Check every shard's size and sha256, every index range and member digest against the tar, and counts;
    return problems.

    As an array job (``num_tasks > 1``): task ``task_index`` checks its contiguous share of the manifest's
    shards, streaming only the index row groups that hold them, and writes its problems under ``results``
    (default ``OUT/_build/verify``); :func:`verify_merge` then runs the whole-root checks and gathers them.
    Memory: a row group's batch, the rows of the shards in flight (``2 * workers``) and 8 bytes a sample in the
    duplicate check."""
    root = ShardRoot(out, storage_options)
    manifest = root.manifest
    modalities = manifest["modalities"]
    scan = IndexScan(root)
    problems = _global_problems(root, scan) if num_tasks == 1 else []
    entries = [manifest["shards"][i] for i in share(len(manifest["shards"]), task_index, num_tasks)]
    by_path = {e["path"]: e for e in entries}
    checksums = sf.has_checksums(manifest)
    if not checksums:
        log.warning("%s has no member checksums (format version %s): members are checked by the shards' sha256 "
                    "only", out, manifest.get("format_version"))
    found: dict[str, list[str]] = {}
    bar = tqdm(total=len(entries), unit="shard", desc="verify", disable=not progress)

    def check(shard: tuple[str, list[dict[str, Any]]]) -> list[str]:
        path, rows = shard
        return _check_shard(root, by_path[path], rows, modalities, checksums)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for (path, _), shard_problems in bounded_map(pool, check, scan.rows_of(list(by_path)), 2 * max(1, workers),
                                                     order="completion"):
            found[path] = shard_problems
            bar.update(1)
    bar.close()
    for e in entries:
        problems += found[e["path"]]
    summary = {"shards": len(entries), "samples": sum(scan.rows.get(p, 0) for p in by_path) if num_tasks > 1
               else scan.num_rows, "problems": len(problems)}
    if num_tasks > 1:
        summary["task"] = f"{task_index}/{num_tasks}"
        pipe_atomic(root.fs, _result_path(root, results, "verify", task_index, num_tasks),
                    json.dumps({"problems": problems, "summary": summary}).encode())
    return problems, summary


def verify_merge(out: str, num_tasks: int, storage_options: Mapping[str, Any] | None = None,
                 results: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """The merge step of an array verify: the whole-root checks, then every task's problems in task order (the
    manifest's shard order); a task without results is a problem."""
    root = ShardRoot(out, storage_options)
    scan = IndexScan(root)
    problems = _global_problems(root, scan)
    shards = 0
    for t in range(num_tasks):
        path = _result_path(root, results, "verify", t, num_tasks)
        if not root.fs.exists(path):
            problems.append(f"verify task {t} of {num_tasks} left no results ({path}): run it again")
            continue
        with root.fs.open(path, "rb") as f:
            res = json.load(f)
        problems += res["problems"]
        shards += res["summary"]["shards"]
    return problems, {"shards": shards, "samples": scan.num_rows, "problems": len(problems), "tasks": num_tasks}


def recompute_stats(out: str, storage_options: Mapping[str, Any] | None = None, progress: bool = True,
                    task_index: int = 0, num_tasks: int = 1, results: str | None = None) -> str:
    """Recompute ``stats.json`` from the train split's members and publish it atomically.

    Statistics are gathered per shard and the shard states merged in manifest order, as ``finalize`` merges the
    build's, so the result equals the build's ``stats.json`` byte for byte. As an array job (``num_tasks > 1``),
    task ``task_index`` takes its contiguous share of the train shards and writes their states, one JSON line a
    shard, under ``results`` (default ``OUT/_build/stats``); :func:`stats_merge` merges them. Memory: one shard's
    rows and the statistics accumulators (regions x modalities), whatever the number of shards. Returns the path
    written."""
    root = ShardRoot(out, storage_options)
    mods = root.modalities
    names = list(mods)
    train = [s for s in root.manifest["shards"] if s["split"] == "train"]
    entries = [train[i] for i in share(len(train), task_index, num_tasks)]
    scan = IndexScan(root)
    bar = tqdm(total=sum(e["num_samples"] for e in entries), unit="sample", desc="stats", disable=not progress)
    region = {e["path"]: e["region"] for e in entries}
    order = [e["path"] for e in entries]

    def states() -> Iterator[str]:
        """Each shard's state as a JSON line, in manifest order; a shard the index yields early waits for its turn
        (the index is in manifest order, so none does, and one shard's state is held at a time)."""
        pending: dict[str, dict[str, Any]] = {}
        done = 0
        for path, rows in scan.rows_of(order):
            stats = StatsSet(mods.values())
            for r in rows:
                for name in names:
                    if r.get(sf.offset_column(name)) is not None:
                        stats.add(r["region"], name, root.read_member(r, name))
                bar.update(1)
            pending[path] = stats.state(region[path])
            while done < len(order) and order[done] in pending:
                p = order[done]
                yield json.dumps({"path": p, "region": region[p], "stats": pending.pop(p)}, allow_nan=False)
                done += 1
        bar.close()
        if done < len(order):
            raise ValueError(f"{out}: {sf.INDEX} has no rows of train shard {order[done]}")

    if num_tasks > 1:
        path = _result_path(root, results, "stats", task_index, num_tasks)
        with staged(root.fs, path) as tmp, open(tmp, "w") as f:
            for line in states():
                f.write(line + "\n")
        return path
    return _publish_stats(root, [states()])


def _publish_stats(root: ShardRoot, parts: Iterable[Iterable[str]]) -> str:
    stats = StatsSet(root.modalities.values())
    for lines in parts:
        for line in lines:
            if line.strip():
                st = json.loads(line)
                if st["stats"]:
                    stats.merge_state(st["region"], st["stats"])
    path = root.file(sf.STATS)
    pipe_atomic(root.fs, path, sf.dumps_stats(stats.to_json()))
    return path


def stats_merge(out: str, num_tasks: int, storage_options: Mapping[str, Any] | None = None,
                results: str | None = None) -> str:
    """The merge step of an array ``stats``: the tasks' shard states merged in order, a line at a time, into
    ``stats.json``."""
    root = ShardRoot(out, storage_options)
    paths = [_result_path(root, results, "stats", t, num_tasks) for t in range(num_tasks)]
    missing = [p for p in paths if not root.fs.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} stats tasks left no results (e.g. {missing[0]}): run them again")

    def lines(p: str) -> Iterator[str]:
        with root.fs.open(p, "rt") as f:
            yield from f

    return _publish_stats(root, (lines(p) for p in paths))
