"""Per-band statistics of ``stats.json`` as the band plans read them: one scope (global or a region), one value
per band, and an error naming the band and the fix when a value is missing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m3leo_stream.modalities import Modality


def band_stats(stats: Mapping[str, Any], m: Modality, scope: str) -> dict[str, Any] | None:
    """The statistics of modality ``m`` in ``scope`` (``"global"`` or a region name), with a band-name index;
    None when ``stats`` has no entry for ``m``."""
    entry = stats.get(m.name) if stats else None
    if not entry:
        return None
    if scope == "global":
        s = entry.get("global")
    else:
        s = (entry.get("regions") or {}).get(scope)
        if s is None:
            raise KeyError(f"transforms: stats.json has no region {scope!r} for modality {m.name!r}; "
                           f"regions: {', '.join(entry.get('regions') or {})}")
    names = entry.get("bands", list(m.bands))
    return {"index": {b: i for i, b in enumerate(names)}, **(s or {})}


def stat(st: dict[str, Any] | None, m: Modality, band: str, key: str, pct: float | None = None) -> float:
    """One stored-unit statistic of one band, with an error naming the band when stats.json lacks it."""
    value = None
    if st is not None and band in st["index"]:
        i = st["index"][band]
        if pct is None:
            value = (st.get(key) or [None] * (i + 1))[i]
        else:
            value = ((st.get("percentiles") or {}).get(f"{pct:g}") or [None] * (i + 1))[i]
    if value is None:
        what = f"percentile {pct:g}" if pct is not None else key
        raise KeyError(f"transforms: stats.json has no {what} for band {band!r} of modality {m.name!r}; "
                       f"rebuild stats (m3leo-shards stats ROOT) or set transforms.modalities.{m.name}.mean/std/clip")
    return float(value)
