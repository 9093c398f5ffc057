"""Per-task partial indexes: what ``finalize`` needs of one build task's shards, written by the task as it ends, so
that finalize reads a few Parquet files rather than every shard record.

``_build/parts/task-<i>-of-<n>.json`` (the commit point, written last) names ``task-<i>-of-<n>-<id>.parquet``, the
index rows of the task's shards in plan order in row groups of :data:`PART_ROW_GROUP` rows, and
``task-<i>-of-<n>-<id>.jsonl``, one line per shard in the same order: what its record says besides its rows and
the float bands' moments of its statistics state (:func:`shard_meta`). The JSON lists the shards (path, rows,
record size) and holds the task's statistics counts summed over its shards (histograms, pixel counts, min and max:
integer sums and extrema, exact in any order). finalize adds up the counts of all partials first, then reads the
partials shard by shard in plan order (their JSONL line by line) and merges each shard's moments in that order,
which is exactly what merging the shards' whole states one after another does (``StatsSet.merge_counts`` /
``merge_moments``): its outputs are byte for byte those it writes from the records.

A partial is used only when every shard it lists is in the plan, in plan order, has a record of the size it noted
(a shard rebuilt since, e.g. under another task layout, is read from its record), and is listed by no partial
already taken; the shards no partial covers are read from their records.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import Modality
from m3leo_stream.storage import join
from shard_tools.stats import StatsSet

log = logging.getLogger(__name__)
PARTS = "_build/parts"
PART_ROW_GROUP = 4096
"""Rows per row group of a partial index: finalize reads all partials at once, about one row group of each."""


def record_table(record: Mapping[str, Any], schema: Any) -> Any:
    """A shard record's index rows as an Arrow table of the index schema."""
    import pyarrow as pa

    rows = record["rows"]
    return pa.table({f.name: pa.array(rows.get(f.name, []), f.type) for f in schema}, schema=schema)


def shard_meta(record: Mapping[str, Any], stats: StatsSet, examples: int) -> dict[str, Any]:
    """What finalize takes from a shard record besides its rows and its statistics counts: manifest fields, counts,
    the first ``examples`` error and empty-member examples, the build arguments it checks, and the float moments of
    the statistics state (None for shards without statistics)."""
    r = record
    return {"path": r["path"], "region": r["region"], "split": r["split"], "num_samples": r["num_samples"],
            "bytes": r["bytes"], "sha256": r["sha256"], "errors": r["errors"][:examples],
            "empty_examples": r.get("empty_examples", [])[:examples], "skipped_chips": r["skipped_chips"],
            "skipped_members": r["skipped_members"], "empty_members": r.get("empty_members", 0),
            "encodings": r.get("encodings", {}), "resolutions": r.get("resolutions", {}),
            "checksums": sf.checksum_column(sf.JSON_MEMBER) in r["rows"],
            "moments": stats.moments(r["stats"]) if r["stats"] else None}


def _name(task_index: int, num_tasks: int) -> str:
    return f"task-{task_index:05d}-of-{num_tasks:05d}"


def _read_records(fs: Any, root: str, paths: Iterable[str]) -> Iterator[tuple[dict[str, Any], int]]:
    from shard_tools.build import _record_path

    for path in paths:
        data = fs.cat_file(_record_path(root, path))
        yield json.loads(data), len(data)


def write_partial(fs: Any, root: str, header: Mapping[str, Any], task_index: int, num_tasks: int,
                  records: Iterable[tuple[dict[str, Any], int]] | None = None) -> str | None:
    """Write the partial index of task ``task_index`` of ``num_tasks`` from the records of its shards (all built),
    read one at a time in plan order (``records``: those records and their sizes in bytes, where the caller has
    them); returns its JSON path, or None where a record lacks member checksums or has other ``--resolution``
    values (finalize reads such records itself, and refuses them with the message)."""
    from shard_tools import plan_io
    from shard_tools.build import ERROR_EXAMPLES, _resolutions
    from shard_tools.finalize import BUILD_DIR, RowGroupWriter, index_schema_of
    from shard_tools.publish import pipe_atomic, put_atomic, staging_path

    paths = [s["path"] for s in plan_io.iter_shards(fs, root, header) if s["group"] % num_tasks == task_index]
    schema = index_schema_of(header)
    stats = StatsSet(Modality.from_json(header["modality_entries"][n]) for n in header["modalities"])
    resolutions = _resolutions(header)
    name = _name(task_index, num_tasks)
    ident = uuid.uuid4().hex[:12]
    index_name, meta_name = f"{name}-{ident}.parquet", f"{name}-{ident}.jsonl"
    tmp, tmp_meta = (staging_path(fs, join(root, PARTS, n), join(root, BUILD_DIR)) for n in (index_name, meta_name))
    listed: list[list[Any]] = []
    try:
        writer = RowGroupWriter(tmp, schema, PART_ROW_GROUP)
        with open(tmp_meta, "w") as lines:
            try:
                for path, (r, size) in zip(paths, _read_records(fs, root, paths) if records is None else records,
                                           strict=True):
                    if r["path"] != path:
                        raise ValueError(f"task {task_index}/{num_tasks}: record of {r['path']} where the plan "
                                         f"has {path}")
                    meta = shard_meta(r, stats, ERROR_EXAMPLES)
                    if not meta["checksums"] or meta["resolutions"] != resolutions:
                        log.warning("task %d/%d: no partial index (%s was built %s); finalize reads the records",
                                    task_index, num_tasks, path, "without member checksums"
                                    if not meta["checksums"] else "with other --resolution values")
                        return None
                    table = record_table(r, schema)
                    writer.add(table)
                    if r["stats"]:
                        stats.merge_counts(r["region"], r["stats"])
                    lines.write(json.dumps(meta, allow_nan=False) + "\n")
                    listed.append([path, table.num_rows, size])
            finally:
                writer.close()
        put_atomic(fs, tmp, join(root, PARTS, index_name))
        put_atomic(fs, tmp_meta, join(root, PARTS, meta_name))
    finally:
        for t in (tmp, tmp_meta):
            if os.path.exists(t):
                os.remove(t)
    head = join(root, PARTS, f"{name}.json")
    previous = json.loads(fs.cat_file(head)) if fs.exists(head) else {}
    body = {"task_index": task_index, "num_tasks": num_tasks, "index": index_name, "metas": meta_name,
            "shards": listed, "stats": {region: stats.state(region) for region in sorted(stats.regions)}}
    pipe_atomic(fs, head, json.dumps(body, allow_nan=False).encode())
    for old in (previous.get("index"), previous.get("metas")):
        if old and old not in (index_name, meta_name) and fs.exists(join(root, PARTS, old)):
            fs.rm(join(root, PARTS, old))
    log.info("task %d/%d: partial index of %d shards written to %s", task_index, num_tasks, len(listed), head)
    return head


class PartReader:
    """One partial index, read shard by shard in its order (about one row group held)."""

    def __init__(self, fs: Any, root: str, body: Mapping[str, Any], schema: Any):
        import pyarrow.parquet as pq

        from shard_tools.finalize import iter_batches

        self.name = body["index"]
        self.file = fs.open(join(root, PARTS, self.name), "rb")
        pf = pq.ParquetFile(self.file)
        if not pf.schema_arrow.remove_metadata().equals(schema):
            self.file.close()
            raise ValueError("its index columns differ from the plan's")
        if pf.metadata.num_rows != sum(rows for _, rows, _ in body["shards"]):
            self.file.close()
            raise ValueError("its row count differs from its shards'")
        self.meta_file = fs.open(join(root, PARTS, body["metas"]), "rb")
        self.listed = deque(body["shards"])
        self.schema = schema
        self.batches = iter_batches(pf, PART_ROW_GROUP)
        self.buffer: Any = None

    def take(self, path: str) -> tuple[dict[str, Any], Any]:
        """The next shard's metadata and index rows; it must be ``path``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        listed, rows, _ = self.listed.popleft()
        meta = json.loads(self.meta_file.readline())
        if not listed == meta["path"] == path:
            raise ValueError(f"partial index {self.name} lists {meta['path']} where the plan has {path}")
        meta["rows"] = rows
        parts = [self.buffer] if self.buffer is not None else []
        have = self.buffer.num_rows if self.buffer is not None else 0
        while have < meta["rows"]:
            b = next(self.batches)
            parts.append(pa.Table.from_batches([b]).cast(self.schema))
            have += b.num_rows
        table = pa.concat_tables(parts) if parts else self.schema.empty_table()
        self.buffer = table.slice(meta["rows"])
        table = table.slice(0, meta["rows"])
        if table.num_rows and not pc.all(pc.equal(table.column("shard"), path)).as_py():
            raise ValueError(f"partial index {self.name}: the rows listed for {path} are another shard's")
        return meta, table

    def close(self) -> None:
        self.file.close()
        self.meta_file.close()


def open_partials(fs: Any, root: str, schema: Any, positions: Mapping[str, int], record_sizes: Mapping[str, int],
                  stats: StatsSet) -> dict[str, PartReader]:
    """The usable partial indexes of a build output (see the module docstring), by the shard paths they cover;
    their statistics counts are added to ``stats``."""
    d = join(root, PARTS)
    if not fs.exists(d):
        return {}
    taken: dict[str, PartReader] = {}
    for head in sorted(p for p in fs.ls(d, detail=False) if p.endswith(".json")):
        body = json.loads(fs.cat_file(head))
        shards = body["shards"]
        order = [positions.get(path, -1) for path, _, _ in shards]
        why = None
        if min(order, default=0) < 0:
            why = "it lists shards that are not in the plan"
        elif any(b <= a for a, b in zip(order, order[1:])):
            why = "its shards are not in plan order"
        elif any(record_sizes.get(path) != size for path, _, size in shards):
            why = "shard records were written again since"
        elif any(path in taken for path, _, _ in shards):
            why = "another partial index already covers its shards"
        reader = None
        if why is None:
            try:
                reader = PartReader(fs, root, body, schema)
            except (OSError, ValueError) as e:
                why = str(e)
        if reader is None:
            log.warning("finalize: not using %s (%s): its shards are read from their records", head, why)
            continue
        for path, _, _ in shards:
            taken[path] = reader
        for region, states in body["stats"].items():
            stats.merge_counts(region, states)
    return taken
