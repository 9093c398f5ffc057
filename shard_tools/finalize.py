"""``m3leo-shards finalize``, streaming: merge the shards of all tasks into ``index.parquet``, ``stats.json`` and
``manifest.json`` in memory bounded independently of the shard count.

The shards are taken one at a time in plan order: from the partial index of the array task that built them
(``shard_tools.partials``: its rows and metadata read in step, its statistics counts added up front), or, where no
usable partial covers a shard (a one-task build, a task that wrote none), from its record. Each shard's index rows
are appended to a buffer of at most one row group (:data:`ROW_GROUP` rows, as ``pq.write_table`` cut them before) and
written by a ``ParquetWriter`` to a temporary file as soon as a row group is complete; its statistics are merged
into one :class:`StatsSet` in the same order as before, so every output is byte for byte what the single in-memory
merge wrote. Nothing is published until every shard has been read and checked: the index, then ``stats.json``, then
``manifest.json`` (the commit point readers look for) are put into place last, each atomically.

Memory: one record (or about one row group of each partial), at most two row groups of Arrow rows (about 0.4 KB a
sample with all nine modalities: ~30 MB), the statistics accumulator (regions x modalities dense histograms,
independent of shards), 8 bytes per sample (the hashes of the duplicate-key check) and about 1 KB per shard (the
manifest's shard list, which ``manifest.json`` holds anyway, and the partials' list of their shards; measured by
``bench/build_scale.py``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import Modality
from m3leo_stream.storage import get_fs, join
from shard_tools import partials
from shard_tools.downsample import MANIFEST_KEY, entry_json
from shard_tools.publish import pipe_atomic, put_atomic, staging_path
from shard_tools.stats import StatsSet

log = logging.getLogger(__name__)
ROW_GROUP = 65536  # rows per index row group (what pq.write_table(row_group_size=65536) wrote before)


def iter_batches(pf: Any, batch_size: int = ROW_GROUP, columns: Sequence[str] | None = None) -> Iterator[Any]:
    """The record batches of a ``pq.ParquetFile``, one row group at a time: ``ParquetFile.iter_batches`` over all
    row groups pre-buffers every one of them (the whole file's requested columns) before its first batch, so a
    reader would hold its file rather than a row group."""
    for g in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_size, row_groups=[g], columns=columns)


def key_hashes(region: Any, key: Any) -> np.ndarray:
    """64-bit digests of (region, key) pairs (pyarrow string arrays): the duplicate check keeps 8 bytes a sample."""
    import xxhash

    return np.fromiter((xxhash.xxh3_64_intdigest(f"{r}\0{k}".encode()) for r, k in zip(region.to_pylist(),
                                                                                     key.to_pylist())),
                       dtype=np.uint64, count=len(key))


def repeated(hashes: list[np.ndarray]) -> np.ndarray:
    """The digests that occur more than once."""
    if not hashes:
        return np.zeros(0, np.uint64)
    h = np.sort(np.concatenate(hashes))
    return np.unique(h[1:][h[1:] == h[:-1]])


def duplicate_keys(batches: Iterator[Any], suspects: np.ndarray) -> list[tuple[str, str]]:
    """(region, key) pairs that really occur more than once among the rows whose digest is in ``suspects``, in
    the order they first occur (a second pass over ``region``/``key`` batches; digest collisions are dropped)."""
    seen: Counter = Counter()
    for b in batches:
        h = key_hashes(b.column("region"), b.column("key"))
        for i in np.flatnonzero(np.isin(h, suspects)):
            seen[(b.column("region")[i].as_py(), b.column("key")[i].as_py())] += 1
    return [k for k, n in seen.items() if n > 1]


def _range_problem(table: Any, size: int, members: list[str]) -> str | None:
    """The first member of one shard's rows whose byte range ends beyond the shard's ``size``, as a message."""
    for member in members:
        off = table.column(sf.offset_column(member)).fill_null(0).to_numpy()
        end = off + table.column(sf.nbytes_column(member)).fill_null(0).to_numpy()
        bad = np.flatnonzero(end > size)
        if len(bad):
            i = int(bad[0])
            return (f"{table.column('shard')[i].as_py()} key {table.column('key')[i].as_py()} member {member}: "
                    f"its range ends at byte {int(end[i])}, the shard has {size}")
    return None


class RowGroupWriter:
    """Appends Arrow tables and writes them as row groups of exactly ``rows`` rows (the last shorter), each one
    contiguous, as ``pq.write_table(table, row_group_size=rows)`` cuts one big table; holds at most one row group
    besides the table being added."""

    def __init__(self, path: str, schema: Any, rows: int | None = None):
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.schema = schema
        self.size = rows or ROW_GROUP
        self.parts: list[Any] = []
        self.rows = 0
        self.written = 0

    def add(self, table: Any) -> None:
        self.parts.append(table)
        self.rows += table.num_rows
        while self.rows >= self.size:
            self._write(self.size)

    def _write(self, n: int) -> None:
        import pyarrow as pa

        buf = pa.concat_tables(self.parts) if self.parts else self.schema.empty_table()
        self.writer.write_table(buf.slice(0, n).combine_chunks(), row_group_size=self.size)
        rest = buf.slice(n)
        self.parts, self.rows = ([rest.combine_chunks()] if rest.num_rows else []), rest.num_rows
        self.written += n

    def close(self) -> None:
        """Write what is left (an empty row group for an empty index, as ``pq.write_table`` does)."""
        if self.rows or not self.written:
            self._write(self.rows)
        self.writer.close()


BUILD_DIR = "_build"


def index_schema_of(plan: Mapping[str, Any]) -> Any:
    """The index schema of a plan header (its modalities, in order, and its compression)."""
    bands = {n: len(plan["modality_entries"][n]["bands"]) for n in plan["modalities"]}
    return sf.index_schema(bands, plan["args"]["compress"] == "zstd")


def record_sizes(fs: Any, root: str) -> dict[str, int]:
    """The byte size of every shard record, by shard path, from one listing of the records."""
    from shard_tools.build import _record_path

    base = join(root, BUILD_DIR, "shards")
    if not fs.exists(base):
        return {}
    prefix = fs._strip_protocol(base).rstrip("/") + "/"
    out = {}
    for name, info in fs.find(base, detail=True).items():
        name = fs._strip_protocol(name)
        if name.startswith(prefix) and name.endswith(".json") and ".partial-" not in name:
            out[name[len(prefix):-len(".json")] + ".tar"] = int(info["size"])
    probe = next(iter(out), None)
    if probe is not None and fs._strip_protocol(_record_path(root, probe)) != prefix + probe[:-4] + ".json":
        raise RuntimeError(f"{base}: record paths do not map back to shard paths")
    return out


def finalize(out: str, storage_options: Mapping[str, Any] | None = None, source: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Merge the shard records of all tasks into ``index.parquet``, ``stats.json`` and ``manifest.json``,
    streaming (see the module docstring for the memory bound)."""
    import pyarrow.parquet as pq

    from m3leo_stream import __version__
    from shard_tools import build as b
    from shard_tools import plan_io

    fs, root = get_fs(out, storage_options)
    plan = plan_io.read_header(fs, root)
    if plan is None:
        raise b.BuildError(f"{out}: no {b.PLAN}; run 'm3leo-shards build' first")
    shards = [s["path"] for s in plan_io.iter_shards(fs, root, plan)]
    sizes = record_sizes(fs, root)
    missing = [p for p in shards if p not in sizes]
    if missing:
        raise b.BuildError(f"{len(missing)} of {len(shards)} shards are not built yet "
                           f"(e.g. {', '.join(missing[:3])}); run the remaining build tasks, then finalize")
    entries = {n: plan["modality_entries"][n] for n in plan["modalities"]}
    resolutions = {n: int(e[MANIFEST_KEY]["px"]) for n, e in entries.items() if MANIFEST_KEY in e}
    modalities = [Modality.from_json(e) for e in entries.values()]
    downsampled = {n: e[MANIFEST_KEY] for n, e in entries.items() if MANIFEST_KEY in e}
    schema = index_schema_of(plan)
    member_list = [sf.JSON_MEMBER, *(m.name for m in modalities)]
    stats = StatsSet(modalities)
    parts = partials.open_partials(fs, root, schema, {p: i for i, p in enumerate(shards)}, sizes, stats)
    del sizes
    other: list[tuple[str, Any]] = []  # records of other --resolution values
    lacking: list[str] = []  # records without member checksums
    range_problem: str | None = None
    hashes: list[np.ndarray] = []
    errors: list[str] = []
    empty: list[str] = []
    seen: Counter = Counter()
    counts: Counter = Counter()
    per_split: dict[str, Counter] = {}
    present: Counter[str] = Counter()
    manifest_shards: list[sf.ShardEntry] = []
    num_rows = 0
    tmp = staging_path(fs, join(root, sf.INDEX), join(root, BUILD_DIR))  # beside the build records
    try:
        writer = RowGroupWriter(tmp, schema)
        try:
            for path in tqdm(shards, unit="shard", desc="finalize", disable=not progress):
                part = parts.get(path)
                if part is not None:
                    try:
                        r, table = part.take(path)
                    except (ValueError, StopIteration) as e:
                        raise b.BuildError(f"{out}: partial index {part.name} is damaged ({e!r}): delete "
                                           f"{partials.PARTS}/ and finalize again (from the shard records)") from e
                else:
                    with fs.open(b._record_path(root, path), "rb") as f:
                        record = json.load(f)
                    r, table = partials.shard_meta(record, stats, b.ERROR_EXAMPLES), None
                if r["resolutions"] != resolutions:
                    other.append((r["path"], r["resolutions"]))
                if not r["checksums"]:
                    lacking.append(r["path"])
                if other or lacking:
                    continue  # refused below; the rest is only read for the counts in the message
                if table is None:
                    table = partials.record_table(record, schema)
                    if record["stats"]:
                        stats.merge_counts(r["region"], record["stats"])
                    del record
                if range_problem is None:
                    range_problem = _range_problem(table, r["bytes"], member_list)
                hashes.append(key_hashes(table.column("region"), table.column("key")))
                for m in modalities:
                    present[m.name] += table.num_rows - table.column(sf.offset_column(m.name)).null_count
                num_rows += table.num_rows
                writer.add(table)
                del table
                if r["moments"] is not None:
                    stats.merge_moments(r["region"], r["moments"])
                errors += r["errors"][: max(0, b.ERROR_EXAMPLES - len(errors))]
                empty += r["empty_examples"][: max(0, b.ERROR_EXAMPLES - len(empty))]
                counts["skipped_chips"] += r["skipped_chips"]
                counts["skipped_members"] += r["skipped_members"]
                counts["empty_members"] += r["empty_members"]
                for k, n in r["encodings"].items():
                    seen[k] += n
                per_split.setdefault(r["region"], Counter())[r["split"]] += r["num_samples"]
                manifest_shards.append({"path": r["path"], "region": r["region"], "split": r["split"],
                                        "num_samples": r["num_samples"], "bytes": r["bytes"], "sha256": r["sha256"]})
        finally:
            writer.close()
            for part in set(parts.values()):
                part.close()
        if other:  # array tasks that started at once, with other --resolution values, each wrote the plan
            raise b.BuildError(
                f"{len(other)} shards were built with other --resolution values than {b.PLAN} says "
                f"(e.g. {other[0][0]}: {other[0][1] or 'canonical sizes'}, plan: {resolutions or 'canonical sizes'}); "
                "every task of a build must be given the same values: build again into a new output location")
        if lacking:
            raise b.BuildError(f"{len(lacking)} shards were built without member checksums, by an older version "
                               f"(e.g. {lacking[0]}): build them again (delete their records under "
                               f"{b.BUILD_DIR}/shards/), then finalize")
        if range_problem:
            raise b.BuildError(range_problem)
        suspects = repeated(hashes)
        del hashes
        if len(suspects):
            batches = iter_batches(pq.ParquetFile(tmp), columns=["region", "key"])
            dup = duplicate_keys(batches, suspects)
            if dup:
                raise b.BuildError(f"duplicate identifiers across shards: {dup[:5]}")
        put_atomic(fs, tmp, join(root, sf.INDEX))
    finally:
        if os.path.exists(tmp):  # not published, or uploaded from here
            os.remove(tmp)
    pipe_atomic(fs, join(root, sf.STATS), sf.dumps_stats(stats.to_json()))
    manifest = sf.Manifest(
        format_version=sf.FORMAT_VERSION,
        checksum=sf.CHECKSUM,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source=source,
        builder={"tool": "m3leo-shards", "version": __version__, "args": plan["args"]},
        regions=plan["regions"],
        splits={r: dict(c) for r, c in sorted(per_split.items())},
        num_samples=num_rows,
        members={m.name: present[m.name] for m in modalities},
        compression=plan["args"]["compress"],
        modalities={m.name: entry_json(m, downsampled) for m in modalities},
        source_folders=plan["folders"],
        shards=manifest_shards,
        discrepancies=plan["discrepancies"],
        skipped={"chips": counts["skipped_chips"] + len(plan["invalid"]), "members": counts["skipped_members"],
                 "examples": (list(plan["invalid"].values()) + errors)[:b.ERROR_EXAMPLES]},
        empty_members={"count": counts["empty_members"], "examples": empty},
        source_encodings=b._nest(seen),
    )
    pipe_atomic(fs, join(root, sf.MANIFEST), manifest.to_json())
    log.info("finalized %s: %d samples in %d shards", out, num_rows, len(manifest_shards))
    return {"samples": num_rows, "shards": len(manifest_shards), "index": join(out, sf.INDEX)}
