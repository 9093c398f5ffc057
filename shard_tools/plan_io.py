"""The build plan on disk: a small JSON header and two Parquet tables, written once, read in shares.

``_build/plan.json`` (the header, published last: the commit point of a plan) holds the build's identity (format
version, content arguments, modality entries, regions, folders, discrepancies, invalid rows), the names of the two
tables, the task count the chip table is laid out for, the source fingerprint and the derived resource hints.
``_build/plan-<id>.shards.parquet`` has one row per shard in plan order (path, region, split, number, reading group,
position in the group, chips). ``_build/plan-<id>.chips.parquet`` has one row per chip: its shard, its chip geometry
and, per modality, where its file lies; rows are sorted by task (``group % num_tasks``), then build order, and
every row group holds one task's rows only, so a task reading ``task == i`` reads only its own row groups (pyarrow
skips the others by their statistics). A task count other than the layout's still works, by filtering the whole
table on ``group % n`` (logged). Plans of earlier versions (``plan.json`` with a ``shards`` list of keys) are read as
before.

The source fingerprint makes reruns of the plan step cheap: it records size and modification time of every
region's split csv, parquet csv and geojson, of every parquet data file, and the modification time of every data
folder (on a POSIX file system a directory's mtime changes whenever an entry is added, removed or renamed in it).
That is one ``stat`` per folder and metadata file, not per chip file. Object stores have no directory times: there
the plan step lists the folders again unless ``--reuse-plan`` is given (chip files replaced in place under the
same name, with the same size, do not change a plan: it holds names and sizes, not contents).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from m3leo_stream.storage import is_local, join
from shard_tools import hub
from shard_tools.grid import Chip

log = logging.getLogger(__name__)
HEADER = "_build/plan.json"
CHIP_ROW_GROUP = 1 << 17  # chip rows per row group of the chip table (within one task's rows)


def read_header(fs: Any, root: str) -> dict[str, Any] | None:
    """The plan header of a build output, or None."""
    path = join(root, HEADER)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def iter_shards(fs: Any, root: str, header: Mapping[str, Any], batch_size: int = 65536) -> Iterator[dict[str, Any]]:
    """The plan's shards in plan order (``path``, ``region``, ``split``, ``group``), streamed from the shard table."""
    if "shards" in header:  # a plan of an earlier version
        yield from header["shards"]
        return
    import pyarrow.parquet as pq

    with fs.open(join(root, "_build", header["tables"]["shards"]), "rb") as f:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["path", "region", "split", "group"]):
            yield from b.to_pylist()


def fingerprint(fs: Any, src: str, regions: Sequence[hub.RegionSource]) -> dict[str, Any]:
    """What the plan's listing depended on, at one ``info`` call per region file and data folder (see the module
    docstring); ``complete`` is False where folders have no modification time (object stores)."""
    out: dict[str, Any] = {}
    complete = is_local(fs)

    def info(path: str) -> list[Any]:
        i = fs.info(path)
        mtime = i.get("mtime", i.get("LastModified", i.get("last_modified")))
        return [i.get("size"), str(mtime) if mtime is not None else None, i.get("ETag")]

    for r in regions:
        entry: dict[str, Any] = {}
        for p in (r.split_csv, r.parquet_csv, r.geojson):
            if p:
                entry[p] = info(p)
        if fs.exists(r.data_dir):
            for d in sorted(p for p in fs.ls(r.data_dir, detail=False) if fs.isdir(p)):
                entry[d] = info(d) if complete else None
                if not complete:
                    for e in fs.ls(d, detail=True):
                        if e["name"].endswith(".parquet"):
                            entry[e["name"]] = [e.get("size"), str(e.get("LastModified")), e.get("ETag")]
        out[r.aoi] = entry
    return {"complete": complete, "regions": out}


def _chip_schema(modalities: Sequence[str]) -> Any:
    import pyarrow as pa

    fields = [pa.field("task", pa.int32()), pa.field("shard", pa.int32()), pa.field("group", pa.int32()),
              pa.field("key", pa.string()), pa.field("chip_lon", pa.float64()), pa.field("chip_lat", pa.float64()),
              pa.field("chip_bounds", pa.list_(pa.float64(), 4)), pa.field("chip_area", pa.float64())]
    for m in modalities:
        fields += [pa.field(f"{m}_path", pa.string()), pa.field(f"{m}_folder", pa.string()),
                   pa.field(f"{m}_row_group", pa.int32()), pa.field(f"{m}_row", pa.int32()),
                   pa.field(f"{m}_size", pa.int64())]
    return pa.schema(fields)


def write_plan(fs: Any, root: str, plan: Any, header: dict[str, Any], num_tasks: int) -> dict[str, Any]:
    """Write ``plan`` (a :class:`shard_tools.build.Plan`) as the two tables, then ``header`` naming them; returns
    the header written. The chip table is written a row group at a time (the cuts ``write_table`` makes of each
    task's rows), so that besides the plan only one row group of rows is held. The tables get a fresh name, so that
    a plan being replaced stays whole until the new header is in place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shard_tools.publish import pipe_atomic, staged

    ident = uuid.uuid4().hex[:12]
    names = {"shards": f"plan-{ident}.shards.parquet", "chips": f"plan-{ident}.chips.parquet"}
    mods = [m.name for m in plan.modalities]
    position = {i: (g, p) for g, members in enumerate(plan.groups) for p, i in enumerate(members)}
    shard_rows: dict[str, list[Any]] = {k: [] for k in ("path", "region", "split", "number", "group", "position",
                                                         "chips", "parquet_group")}
    for i, s in enumerate(plan.shards):
        g, p = position[i]
        for k, v in (("path", s.path), ("region", s.region), ("split", s.split), ("number", s.number),
                     ("group", g), ("position", p), ("chips", len(s.chips)), ("parquet_group", s.group)):
            shard_rows[k].append(v)
    with staged(fs, join(root, "_build", names["shards"])) as tmp:
        pq.write_table(pa.table(shard_rows), tmp, compression="zstd")
    schema = _chip_schema(mods)
    with (staged(fs, join(root, "_build", names["chips"])) as tmp,
          pq.ParquetWriter(tmp, schema, compression="zstd") as w):
        for task in range(num_tasks):
            cols: dict[str, list[Any]] = {f.name: [] for f in schema}
            written = 0
            for g in range(task, len(plan.groups), num_tasks):
                for i in plan.groups[g]:
                    for c in plan.shards[i].chips:
                        cols["task"].append(task)
                        cols["shard"].append(i)
                        cols["group"].append(g)
                        cols["key"].append(c.key)
                        ch = c.chip
                        cols["chip_lon"].append(ch.lon if ch else None)
                        cols["chip_lat"].append(ch.lat if ch else None)
                        cols["chip_bounds"].append(list(ch.bounds) if ch else None)
                        cols["chip_area"].append(ch.area_km2 if ch else None)
                        for m in mods:
                            ref = c.files.get(m)
                            cols[f"{m}_path"].append(ref.path if ref else None)
                            cols[f"{m}_folder"].append(ref.folder if ref else None)
                            cols[f"{m}_row_group"].append(ref.row_group if ref else None)
                            cols[f"{m}_row"].append(ref.row if ref else None)
                            cols[f"{m}_size"].append(ref.size if ref else None)
                        if len(cols["task"]) == CHIP_ROW_GROUP:  # a full row group: written, its rows dropped
                            w.write_table(pa.table(cols, schema=schema), row_group_size=CHIP_ROW_GROUP)
                            cols = {f.name: [] for f in schema}
                            written += CHIP_ROW_GROUP
            if cols["task"] or (task == 0 and not written):
                w.write_table(pa.table(cols, schema=schema), row_group_size=CHIP_ROW_GROUP)
    header = {**header, "tables": names, "num_tasks": num_tasks, "num_shards": len(plan.shards),
              "num_chips": sum(len(s.chips) for s in plan.shards), "num_groups": len(plan.groups)}
    pipe_atomic(fs, join(root, HEADER), json.dumps(header, sort_keys=True).encode())
    return header


def read_share(fs: Any, root: str, header: Mapping[str, Any], task_index: int, num_tasks: int) -> list[list[Any]]:
    """This task's reading groups (lists of :class:`shard_tools.build.ShardJob`, in build order): reading group
    ``g`` belongs to task ``g % num_tasks``. Reads only this task's rows of the chip table when the table is laid
    out for ``num_tasks``, else the whole table (logged)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shard_tools.build import ChipJob, ShardJob

    tables = header["tables"]
    with fs.open(join(root, "_build", tables["shards"]), "rb") as f:
        shards = pq.read_table(f)
    mine = np.flatnonzero(shards["group"].to_numpy() % num_tasks == task_index)
    jobs: dict[int, Any] = {}
    order: dict[int, tuple[int, int]] = {}
    for i, row in zip(mine.tolist(), shards.take(pa.array(mine, pa.int64())).to_pylist()):
        jobs[i] = ShardJob(row["path"], row["region"], row["split"], row["number"], [], group=row["parquet_group"])
        order[i] = (row["group"], row["position"])
    mods = list(header["modalities"])
    with fs.open(join(root, "_build", tables["chips"]), "rb") as f:
        if int(header.get("num_tasks", 0)) == num_tasks:
            chips = pq.read_table(f, filters=[("task", "=", task_index)])
        else:
            log.warning("the plan's chip table is laid out for %s tasks, not %d: reading it whole to pick this "
                        "task's share (plan again with --num-tasks %d to read only it)", header.get("num_tasks"),
                        num_tasks, num_tasks)
            t = pq.read_table(f)
            chips = t.filter(pa.array(t["group"].to_numpy() % num_tasks == task_index))
    for row in chips.to_pylist():
        files = {}
        for m in mods:
            p = row[f"{m}_path"]
            if p is not None:
                files[m] = hub.FileRef(p, row[f"{m}_folder"], row[f"{m}_row_group"], row[f"{m}_row"], row[f"{m}_size"])
        chip = None
        if row["chip_lon"] is not None:
            chip = Chip(row["key"], row["chip_lon"], row["chip_lat"], tuple(row["chip_bounds"]), row["chip_area"])
        s = jobs[row["shard"]]
        s.chips.append(ChipJob(row["key"], s.region, s.split, chip, files))
    groups: dict[int, list[Any]] = {}
    for i in sorted(jobs, key=order.__getitem__):
        groups.setdefault(order[i][0], []).append(jobs[i])
    return [groups[g] for g in sorted(groups)]
