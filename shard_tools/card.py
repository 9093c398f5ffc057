"""``m3leo-shards card``: a dataset card (README.md at the shard root) from the manifest and statistics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m3leo_stream import shard_format as sf
from m3leo_stream.shard_root import ShardRoot
from shard_tools.publish import pipe_atomic


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def card_text(manifest: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    """The card of a root with this manifest and ``stats.json`` (``{}`` when it has none)."""
    stats = sf.Stats.of(stats)
    regions = manifest["regions"]
    lines = [
        "---",
        "license: cc-by-sa-4.0",
        "task_categories: [image-segmentation, image-feature-extraction]",
        "tags: [earth-observation, sentinel-1, sentinel-2, sar, insar, remote-sensing, webdataset]",
        "---",
        "",
        "# M3LEO shards",
        "",
        f"{manifest['num_samples']} samples of 4480 m × 4480 m chips in {len(manifest['shards'])} tar shards, "
        f"built {manifest['created']} by `m3leo-shards` {manifest['builder']['version']} "
        f"(format version {manifest['format_version']}, compression: {manifest.get('compression')}).",
        "",
        "Each shard holds the samples of one region and one split. A sample's members are `<key>.json` (metadata: "
        "region, split, lon/lat, bounds, CRS, per-modality source file and original shape) and "
        "`<key>.<modality>.npy` (a C,H,W array in the dtype below). `index.parquet` gives each member's byte range; "
        "`stats.json` per-band statistics of the train split over valid pixels only. Physical value = stored value "
        "× the band's scale, in the band's units; stored nodata values are no data. The json names each member's "
        "source encoding and its `missing_bands` (bands without a valid pixel: a season, orbit or month the "
        "exporter had no data for).",
        "",
        "## Samples per region and split",
        "",
        "| region | train | val | test | total |",
        "|---|---|---|---|---|",
    ]
    for r in regions:
        s = manifest["splits"].get(r, {})
        lines.append(f"| {r} | {s.get('train', 0)} | {s.get('val', 0)} | {s.get('test', 0)} | {sum(s.values())} |")
    lines += ["", "## Modalities", ""]
    for name, m in manifest["modalities"].items():
        c, h, w = m["shape"]
        present = manifest.get("members", {}).get(name)
        lines += [
            f"### `{name}` — {m['description']}",
            "",
            f"Source: {m['source']}. Array shape {c}×{h}×{w} ({m['resolution_m']:g} m pixels), dtype `{m['dtype']}`, "
            f"kind `{m['kind']}`, nodata `{m['nodata']}`"
            + (f"; present in {present} samples." if present is not None else "."),
            "",
        ]
        down = m.get("downsampled")
        if down:
            lines.append(f"Stored below its canonical size: {down['px']} px per side, reduced ×{down['factor']} from "
                         f"{down['from_px']} px ({down['from_resolution_m']:g} m) at build time "
                         f"(`--resolution {name}={down['px']}`), {down['method']}: "
                         + "; ".join(f"{k}: {v}" for k, v in down["rules"].items()) + f" ({down['rounding']}).")
            lines.append("")
        if m.get("class_codes"):
            names = m.get("class_names") or [""] * len(m["class_codes"])
            lines.append("Classes: " + ", ".join(f"{code} = {n}" for code, n in zip(m["class_codes"], names)) + ".")
            lines.append("")
        if m.get("special_values"):
            lines.append("Special values: " + ", ".join(f"{k} = {v}" for k, v in m["special_values"].items()) + ".")
            lines.append("")
        encs = m.get("encodings") or []
        used = manifest.get("source_encodings", {}).get(name, {})
        if encs or used:
            lines.append("Source encodings (how the exporters wrote the files, and how they map onto the stored "
                         "values):")
            lines.append("")
            for e in encs:
                lines.append(f"- `{e['name']}` ({e['dtype']}): {e['description']}"
                             + (f" Evidence: {e['evidence']}." if e.get("evidence") else "")
                             + (f" **{used[e['name']]} members in this build.**" if e["name"] in used else ""))
            for k, n in used.items():
                if k not in {e["name"] for e in encs}:
                    lines.append(f"- `{k}`: {n} members in this build.")
            lines.append("")
        if m.get("unverified"):
            lines.append("Not verified against the upstream files: " + "; ".join(m["unverified"]) + ".")
            lines.append("")
        lines += ["| # | band | dtype | units | scale | kind | mean | std | p2 | p98 | nodata |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, band in enumerate(m["bands"]):
            try:
                b = stats.band(name, band)
            except sf.StatsError:  # a root without (these) statistics: dashes
                b = None
            mean, std, nd = (b.mean, b.std, b.nodata_fraction) if b else (None, None, None)
            p2, p98 = (b.percentiles.get(sf.percentile_key(p)) for p in (2, 98)) if b else (None, None)
            lines.append(
                f"| {i} | `{band}` | {m['dtype']} | {m['units'][i] or '–'} | {_fmt(m['scale'][i])} | "
                f"{m['band_kinds'][i]} | {_fmt(mean)} | {_fmt(std)} | {_fmt(p2)} | {_fmt(p98)} | {_fmt(nd)} |")
        try:
            hist = stats.summary(name).get("class_histogram")
        except sf.StatsError:
            hist = None
        if hist:
            total = sum(hist.values())
            lines += ["", "Class histogram (train): " + ", ".join(f"{k}: {v / total:.1%}" for k, v in hist.items())]
        lines.append("")
    lines += ["## Provenance", "", f"- Source: `{manifest.get('source')}`",
              f"- Builder arguments: `{manifest['builder']['args']}`"]
    for r, folders in manifest.get("source_folders", {}).items():
        lines.append(f"- {r}: " + ", ".join(f"{k} ← `{v}`" for k, v in folders.items()))
    disc = manifest.get("discrepancies") or {}
    if disc:
        lines += ["", "## Differences between split files and data folders", "",
                  "| what | count | examples |", "|---|---|---|"]
        for k, v in disc.items():
            lines.append(f"| {k} | {v['count']} | {', '.join(v['examples'][:3])} |")
    skipped = manifest.get("skipped") or {}
    if skipped.get("chips") or skipped.get("members"):
        lines += ["", f"Left out during the build: {skipped['chips']} chips, {skipped['members']} members."]
    empty = (manifest.get("empty_members") or {}).get("count")
    if empty:
        lines += ["", f"Members left out because every pixel was nodata: {empty}."]
    lines += ["", "## Citation", "",
              "Allen et al., *M3LEO: A Multi-Modal, Multi-Label Earth Observation Dataset Integrating "
              "Interferometric SAR and Multispectral Data*, NeurIPS 2024 Datasets and Benchmarks.", ""]
    return "\n".join(lines)


def write_card(out: str, storage_options: Mapping[str, Any] | None = None) -> str:
    root = ShardRoot(out, storage_options)
    try:
        stats = root.stats
    except FileNotFoundError:
        stats = sf.Stats({})
    path = root.file("README.md")
    pipe_atomic(root.fs, path, card_text(root.manifest, stats).encode())
    return path
