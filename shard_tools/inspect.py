"""``m3leo-shards inspect``: what a shard root holds, or one chip's members."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from m3leo_stream import shard_format as sf
from m3leo_stream.shard_root import ShardRoot


def inspect_root(out: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Samples and members per region, split and modality, with shard counts and bytes."""
    root = ShardRoot(out, storage_options)
    m = root.manifest
    mods = list(m["modalities"])
    index = root.read_index(["region", "split", *[sf.offset_column(x) for x in mods]]).to_pydict()
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for i, (region, split) in enumerate(zip(index["region"], index["split"])):
        cell = table.setdefault(region, {}).setdefault(split, {"samples": 0, "members": Counter()})
        cell["samples"] += 1
        for x in mods:
            if index[sf.offset_column(x)][i] is not None:
                cell["members"][x] += 1
    shards: dict[tuple[str, str], list[int]] = {}
    for s in m["shards"]:
        shards.setdefault((s["region"], s["split"]), []).append(s["bytes"])
    for (region, split), sizes in shards.items():
        cell = table.setdefault(region, {}).setdefault(split, {"samples": 0, "members": Counter()})
        cell["shards"] = len(sizes)
        cell["bytes"] = sum(sizes)
    for splits in table.values():
        for cell in splits.values():
            cell["members"] = dict(cell["members"])
    return {
        "root": out, "format_version": m["format_version"], "created": m["created"], "source": m.get("source"),
        "compression": m.get("compression"), "samples": m["num_samples"], "shards": len(m["shards"]),
        "modalities": {x: {"bands": len(v["bands"]), "shape": v["shape"], "dtype": v["dtype"], "kind": v["kind"]}
                       for x, v in m["modalities"].items()},
        "regions": table,
    }


def inspect_key(out: str, key: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One chip: its metadata and, per member, shape, dtype, band names and value range."""
    import numpy as np

    root = ShardRoot(out, storage_options)
    rows = root.read_index(filters=[("key", "=", key)]).to_pylist()
    if not rows:
        raise KeyError(f"no sample with key {key!r} in {out}")
    result = []
    for row in rows:
        entry: dict[str, Any] = {"shard": row["shard"], "meta": root.read_member(row, sf.JSON_MEMBER), "members": {}}
        for name, mod in root.modalities.items():
            if row.get(sf.offset_column(name)) is None:
                continue
            arr = root.read_member(row, name)
            valid = ~mod.is_nodata(arr)
            entry["members"][name] = {
                "shape": list(arr.shape), "dtype": arr.dtype.name, "bytes": row[sf.nbytes_column(name)],
                "bands": list(mod.bands), "valid_fraction": float(valid.mean()),
                "min": float(arr[valid].min()) if valid.any() else None,
                "max": float(arr[valid].max()) if valid.any() else None,
                "mean": float(np.asarray(arr[valid], dtype=np.float64).mean()) if valid.any() else None,
            }
        result.append(entry)
    return {"key": key, "samples": result}
