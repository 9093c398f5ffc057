"""The ``finalize`` of the branch point of the streaming one (commit 7389408), kept verbatim as the reference the
streaming finalize must equal byte for byte. Only the reading of the plan's shard list is adapted to the plan
tables (``plan_io.iter_shards``); everything that makes the outputs is unchanged."""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import Modality
from m3leo_stream.storage import get_fs, join
from shard_tools import plan_io
from shard_tools.build import BUILD_DIR, ERROR_EXAMPLES, PLAN, BuildError, _nest, _record_path
from shard_tools.downsample import MANIFEST_KEY, entry_json
from shard_tools.publish import pipe_atomic
from shard_tools.stats import StatsSet


def _check_ranges(table: Any, shard_bytes: Mapping[str, int], members: Sequence[str]) -> None:
    """Every member's byte range lies inside its shard (the records' sizes), as readers will check it."""
    enc = table.column("shard").dictionary_encode().combine_chunks()
    sizes = np.array([shard_bytes[n] for n in enc.dictionary.to_pylist()] or [0], dtype=np.int64)
    size = sizes[enc.indices.to_numpy(zero_copy_only=False)]
    for member in members:
        off = table.column(sf.offset_column(member)).fill_null(0).to_numpy()
        end = off + table.column(sf.nbytes_column(member)).fill_null(0).to_numpy()
        bad = np.flatnonzero(end > size)
        if len(bad):
            i = int(bad[0])
            raise BuildError(f"{table.column('shard')[i].as_py()} key {table.column('key')[i].as_py()} member "
                             f"{member}: its range ends at byte {int(end[i])}, the shard has {int(size[i])}")


def legacy_finalize(out: str, storage_options: Mapping[str, Any] | None = None,
                    source: str | None = None) -> dict[str, Any]:
    """Merge the shard records of all tasks into ``index.parquet``, ``stats.json`` and ``manifest.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m3leo_stream import __version__

    fs, root = get_fs(out, storage_options)
    plan_path = join(root, PLAN)
    if not fs.exists(plan_path):
        raise BuildError(f"{out}: no {PLAN}; run 'm3leo-shards build' first")
    with fs.open(plan_path, "rb") as f:
        plan = json.load(f)
    records = []
    missing = []
    for s in plan_io.iter_shards(fs, root, plan):
        rp = _record_path(root, s["path"])
        if not fs.exists(rp):
            missing.append(s["path"])
            continue
        with fs.open(rp, "rb") as f:
            records.append(json.load(f))
    if missing:
        raise BuildError(f"{len(missing)} of {len(records) + len(missing)} shards are not built yet "
                         f"(e.g. {', '.join(missing[:3])}); run the remaining build tasks, then finalize")
    entries = {n: plan["modality_entries"][n] for n in plan["modalities"]}
    resolutions = {n: int(e[MANIFEST_KEY]["px"]) for n, e in entries.items() if MANIFEST_KEY in e}
    other = [r["path"] for r in records if r.get("resolutions", {}) != resolutions]
    if other:  # array tasks that started at once, with other --resolution values, each wrote the plan
        found = next(r.get("resolutions", {}) for r in records if r["path"] == other[0])
        raise BuildError(f"{len(other)} shards were built with other --resolution values than {PLAN} says "
                         f"(e.g. {other[0]}: {found or 'canonical sizes'}, plan: {resolutions or 'canonical sizes'}); "
                         "every task of a build must be given the same values: build again into a new output location")
    modalities = [Modality.from_json(e) for e in entries.values()]
    downsampled = {n: e[MANIFEST_KEY] for n, e in entries.items() if MANIFEST_KEY in e}
    columns: dict[str, list[Any]] = {}
    for r in records:
        for col, vals in r["rows"].items():
            columns.setdefault(col, []).extend(vals)
    schema = sf.index_schema({m.name: len(m.bands) for m in modalities}, plan["args"]["compress"] == "zstd")
    lacking = [r["path"] for r in records if sf.checksum_column(sf.JSON_MEMBER) not in r["rows"]]
    if lacking:
        raise BuildError(f"{len(lacking)} shards were built without member checksums, by an older version (e.g. "
                         f"{lacking[0]}): build them again (delete their records under {BUILD_DIR}/shards/), "
                         "then finalize")
    table = pa.table({f.name: pa.array(columns.get(f.name, []), f.type) for f in schema}, schema=schema)
    _check_ranges(table, {r["path"]: r["bytes"] for r in records}, [sf.JSON_MEMBER, *(m.name for m in modalities)])
    keys = table.column("key").to_pylist()
    dup = [k for k, n in Counter(zip(table.column("region").to_pylist(), keys)).items() if n > 1]
    if dup:
        raise BuildError(f"duplicate identifiers across shards: {dup[:5]}")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=65536)
    pipe_atomic(fs, join(root, sf.INDEX), sink.getvalue().to_pybytes())
    stats = StatsSet(modalities)
    for r in records:
        if r["stats"]:
            stats.merge_state(r["region"], r["stats"])
    pipe_atomic(fs, join(root, sf.STATS), json.dumps(stats.to_json(), indent=1, allow_nan=False).encode())
    errors: list[str] = []
    empty: list[str] = []
    seen: Counter = Counter()
    counts: Counter = Counter()
    per_split: dict[str, Counter] = {}
    for r in records:
        errors += r["errors"][: max(0, ERROR_EXAMPLES - len(errors))]
        empty += r.get("empty_examples", [])[: max(0, ERROR_EXAMPLES - len(empty))]
        counts["skipped_chips"] += r["skipped_chips"]
        counts["skipped_members"] += r["skipped_members"]
        counts["empty_members"] += r.get("empty_members", 0)
        for k, n in r.get("encodings", {}).items():
            seen[k] += n
        per_split.setdefault(r["region"], Counter())[r["split"]] += r["num_samples"]
    members = {m.name: table.num_rows - table.column(sf.offset_column(m.name)).null_count for m in modalities}
    manifest = {
        "format_version": sf.FORMAT_VERSION,
        "checksum": sf.CHECKSUM,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "builder": {"tool": "m3leo-shards", "version": __version__, "args": plan["args"]},
        "regions": plan["regions"],
        "splits": {r: dict(c) for r, c in sorted(per_split.items())},
        "num_samples": table.num_rows,
        "members": members,
        "compression": plan["args"]["compress"],
        "modalities": {m.name: entry_json(m, downsampled) for m in modalities},
        "source_folders": plan["folders"],
        "shards": [{"path": r["path"], "region": r["region"], "split": r["split"], "num_samples": r["num_samples"],
                    "bytes": r["bytes"], "sha256": r["sha256"]} for r in records],
        "discrepancies": plan["discrepancies"],
        "skipped": {"chips": counts["skipped_chips"] + len(plan["invalid"]), "members": counts["skipped_members"],
                    "examples": (list(plan["invalid"].values()) + errors)[:ERROR_EXAMPLES]},
        "empty_members": {"count": counts["empty_members"], "examples": empty},
        "source_encodings": _nest(seen),
    }
    pipe_atomic(fs, join(root, sf.MANIFEST), json.dumps(manifest, indent=1, allow_nan=False).encode())
    return {"samples": table.num_rows, "shards": len(records), "index": join(out, sf.INDEX)}

