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
    mods = list(m.modalities)
    index = root.read_index(["region", "split", *[sf.offset_column(x) for x in mods]]).to_pydict()
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for i, (region, split) in enumerate(zip(index["region"], index["split"])):
        cell = table.setdefault(region, {}).setdefault(split, {"samples": 0, "members": Counter()})
        cell["samples"] += 1
        for x in mods:
            if index[sf.offset_column(x)][i] is not None:
                cell["members"][x] += 1
    shards: dict[tuple[str, str], list[int]] = {}
    for s in m.shards:
        shards.setdefault((s["region"], s["split"]), []).append(s["bytes"])
    for (region, split), sizes in shards.items():
        cell = table.setdefault(region, {}).setdefault(split, {"samples": 0, "members": Counter()})
        cell["shards"] = len(sizes)
        cell["bytes"] = sum(sizes)
    for splits in table.values():
        for cell in splits.values():
            cell["members"] = dict(cell["members"])
    return {
        "root": out, "format_version": m.format_version, "created": m.created, "source": m.source,
        "compression": m.compression, "samples": m.num_samples, "shards": len(m.shards),
        "modalities": {x: {"bands": len(v["bands"]), "shape": v["shape"], "dtype": v["dtype"], "kind": v["kind"]}
                       for x, v in m.modalities.items()},
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


def list_keys(out: str, storage_options: Mapping[str, Any] | None = None, regions: list[str] | None = None,
              splits: list[str] | None = None) -> list[dict[str, Any]]:
    """``key, region, split, shard`` of every sample (of ``regions``/``splits`` when given), in index order."""
    filters = [f for f in (("region", "in", regions) if regions else None,
                           ("split", "in", splits) if splits else None) if f is not None]
    root = ShardRoot(out, storage_options)
    return root.read_index(["key", "region", "split", "shard"], filters=filters or None).to_pylist()


_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _grid(rows: list[list[str]], right_from: int = 1, indent: str = "  ") -> list[str]:
    """Rows as aligned columns: those before ``right_from`` left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) if i < right_from else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def format_root(summary: Mapping[str, Any]) -> str:
    """:func:`inspect_root`'s result as tables: samples and shards per region and split, then the modalities."""
    regions: Mapping[str, Mapping[str, Mapping[str, Any]]] = summary["regions"]
    splits = sorted({s for r in regions.values() for s in r}, key=lambda s: (_SPLIT_ORDER.get(s, 3), s))
    total_bytes = sum(c.get("bytes", 0) for r in regions.values() for c in r.values())
    lines = [f"{summary['root']}: {summary['samples']} samples in {summary['shards']} shards, {_size(total_bytes)}",
             f"  format {summary['format_version']}, compression {summary['compression'] or 'none'}, "
             f"created {summary['created']}" + (f" from {summary['source']}" if summary.get("source") else ""), ""]

    def table(title: str, cell) -> None:
        rows = [[title, *splits, "all"]]
        for region in sorted(regions):
            cells = [regions[region].get(s) for s in splits]
            rows.append([region, *(cell([c]) if c else "-" for c in cells), cell(list(regions[region].values()))])
        rows.append(["all", *(cell([regions[r][s] for r in regions if s in regions[r]]) for s in splits),
                     cell([c for r in regions.values() for c in r.values()])])
        lines.extend(_grid(rows))
        lines.append("")

    table("samples", lambda cells: str(sum(c["samples"] for c in cells)))
    table("shards", lambda cells: f"{sum(c.get('shards', 0) for c in cells)} "
                                  f"({_size(sum(c.get('bytes', 0) for c in cells))})")
    present: Counter[str] = Counter()
    for r in regions.values():
        for c in r.values():
            present.update(c["members"])
    n = summary["samples"]
    rows = [["modality", "kind", "dtype", "shape", "bands", "samples with it"]]
    for name, m in summary["modalities"].items():
        k = present.get(name, 0)
        rows.append([name, m["kind"], m["dtype"], "x".join(map(str, m["shape"])), str(m["bands"]),
                     f"{k} ({k / n:.0%})" if n else "0"])
    lines.extend(_grid(rows, right_from=4))
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_key(result: Mapping[str, Any]) -> str:
    """:func:`inspect_key`'s result as a table of members per sample with the key."""
    lines: list[str] = []
    for s in result["samples"]:
        meta = s["meta"] if isinstance(s["meta"], Mapping) else {}
        where = ", ".join(f"{k} {meta[k]:.4f}" if isinstance(meta[k], float) else f"{k} {meta[k]}"
                          for k in ("region", "split", "lon", "lat") if k in meta)
        lines.append(f"{result['key']} in {s['shard']}" + (f" ({where})" if where else ""))
        rows = [["member", "shape", "dtype", "bytes", "valid", "min", "max", "mean"]]
        for name, m in s["members"].items():
            rows.append([name, "x".join(map(str, m["shape"])), m["dtype"], _size(m["bytes"]),
                         f"{m['valid_fraction']:.0%}", _num(m["min"]), _num(m["max"]), _num(m["mean"])])
        lines.extend(_grid(rows, right_from=3))
        lines.append("")
    return "\n".join(lines).rstrip("\n")
