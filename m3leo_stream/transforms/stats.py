"""Per-band statistics of ``stats.json`` as the band plans read them: one scope (global or a region), through the
format's one lookup (:class:`~m3leo_stream.shard_format.Stats`), its errors completed with the transforms' own fix."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import Modality


def band_stats(stats: Mapping[str, Any], m: Modality, scope: str) -> Callable[..., float]:
    """The statistics lookup of modality ``m`` in ``scope`` (``"global"`` or a region name)."""
    return functools.partial(sf.Stats.of(stats).value, m.name, scope=scope)


def stat(st: Callable[..., float], m: Modality, band: str, key: str, pct: float | None = None) -> float:
    """One stored-unit statistic of one band; the error names what stats.json lacks."""
    try:
        return st(band, key if pct is None else pct)
    except sf.StatsError as e:
        raise sf.StatsError(f"transforms: {e}; or set transforms.modalities.{m.name}.mean/std/clip") from None
