"""``stats.json``: per-band statistics of the train split over valid pixels, per modality, globally and per region.

One lookup (:meth:`Stats.value`, :meth:`Stats.band`) and one error: whatever is missing (a modality, a region, a
band, a statistic) raises :class:`StatsError` naming it and what the file has instead."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from m3leo_stream.shard_format.errors import FormatError
from m3leo_stream.shard_format.layout import STATS, loads_object

PERCENTILES = (0.5, 1.0, 2.0, 98.0, 99.0, 99.5)
BAND_FIELDS = ("count", "mean", "std", "min", "max", "nodata_fraction")  # lists, one value per band
Field = Literal["count", "mean", "std", "min", "max", "nodata_fraction"]
GLOBAL = "global"
RECOMPUTE = "m3leo-shards stats ROOT recomputes the file"


def percentile_key(p: float) -> str:
    """The key of percentile ``p`` under a scope's ``percentiles`` (``2.0`` → ``"2"``)."""
    return f"{p:g}"


def dumps_stats(obj: Mapping[str, Any]) -> bytes:
    """The bytes of ``stats.json`` for its JSON object (``shard_tools.stats.StatsSet.to_json``)."""
    return json.dumps(obj, indent=1, allow_nan=False).encode()


class StatsError(FormatError, KeyError):
    """``stats.json`` lacks a statistic that was asked for (a :class:`KeyError` too: a lookup that failed)."""

    __str__ = FormatError.__str__  # the message as written, not KeyError's repr of it


@dataclass(frozen=True)
class BandStats:
    """The statistics of one band in one scope, in stored units; ``None`` where the band had no valid pixel."""

    modality: str
    band: str
    scope: str
    count: int | None
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nodata_fraction: float | None
    percentiles: dict[str, float | None]  # percentile_key(p) → value


class Stats(Mapping[str, Any]):
    """A parsed ``stats.json``; also a read-only mapping of its JSON (modality → entry).

    An entry is ``{"bands": [...], "split": "train", "global": SCOPE, "regions": {region: SCOPE}}``; a scope holds
    ``num_samples`` and, per band in the order of ``bands``, the lists of :data:`BAND_FIELDS` and ``percentiles``
    (:data:`PERCENTILES` → lists), and for categorical modalities ``class_histogram`` (code → pixels)."""

    def __init__(self, data: Mapping[str, Any], where: str = STATS):
        self._data = data
        self.where = where

    @classmethod
    def loads(cls, data: bytes | str, where: str = STATS) -> Stats:
        obj = loads_object(data, where)
        return cls(obj, where)

    @classmethod
    def of(cls, stats: Mapping[str, Any] | None) -> Stats:
        """``stats`` itself when it is a :class:`Stats`, else its JSON object read as one."""
        return stats if isinstance(stats, Stats) else cls(stats or {})

    def __getitem__(self, modality: str) -> Any:
        return self._data[modality]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Stats({self.where!r}, modalities={list(self._data)})"

    def subset(self, modalities: Iterable[str]) -> dict[str, Any]:
        """The JSON entries of those of ``modalities`` that the file has, in that order."""
        return {m: self._data[m] for m in modalities if m in self._data}

    def _missing(self, what: str, modality: str, scope: str, reason: str) -> StatsError:
        where = "" if scope == GLOBAL else f" in region {scope!r}"
        return StatsError(f"{self.where} has no {what} of modality {modality!r}{where}: {reason} ({RECOMPUTE})")

    def _scope(self, modality: str, scope: str, what: str) -> Mapping[str, Any]:
        entry = self._data.get(modality)
        if not entry:
            have = ", ".join(self._data)
            raise self._missing(what, modality, scope, f"it has statistics of {have} only" if have else
                                "it has no statistics at all")
        if scope == GLOBAL:
            s = entry.get(GLOBAL)
        else:
            s = (entry.get("regions") or {}).get(scope)
        if s is None:
            regions = ", ".join(entry.get("regions") or {}) or "none"
            raise self._missing(what, modality, scope, f"its regions are {regions}")
        return s

    def summary(self, modality: str, scope: str = GLOBAL) -> Mapping[str, Any]:
        """The JSON of ``modality``'s statistics in ``scope`` (``"global"`` or a region)."""
        return self._scope(modality, scope, "statistics")

    def _index(self, modality: str, band: str, scope: str, what: str) -> tuple[Mapping[str, Any], int]:
        s = self._scope(modality, scope, what)
        names = list(self._data[modality].get("bands") or [])
        if band not in names:
            raise self._missing(what, modality, scope, f"its bands are {', '.join(names) or 'none'}")
        return s, names.index(band)

    def band(self, modality: str, band: str, scope: str = GLOBAL) -> BandStats:
        """All statistics of one band (``None`` where it had no valid pixel)."""
        s, i = self._index(modality, band, scope, f"band {band!r}")

        def at(values: Any) -> Any:
            return values[i] if isinstance(values, list) and i < len(values) else None

        return BandStats(modality, band, scope, **{f: at(s.get(f)) for f in BAND_FIELDS},
                         percentiles={k: at(v) for k, v in (s.get("percentiles") or {}).items()})

    def value(self, modality: str, band: str, stat: Field | float, scope: str = GLOBAL) -> float:
        """One statistic of one band: a field of :data:`BAND_FIELDS`, or a percentile given as a number."""
        holder: str | None = None  # the field holding the value lists (percentiles), or the scope itself
        if isinstance(stat, str):
            what, key = str(stat), str(stat)
        else:
            key = percentile_key(stat)
            what, holder = f"percentile {key}", "percentiles"
        what += f" for band {band!r}"
        s, i = self._index(modality, band, scope, what)
        fields = (s.get(holder) or {}) if holder else s
        values = fields.get(key)
        if values is None:
            have = ", ".join(fields) if holder else ", ".join(k for k in BAND_FIELDS if k in s)
            kind = "percentiles" if holder else "per-band statistics"
            raise self._missing(what, modality, scope, f"it holds {kind} {have}" if have else f"it holds no {kind}")
        v = values[i] if isinstance(values, list) and i < len(values) else None
        if v is None:
            raise self._missing(what, modality, scope, "the band has no valid pixel there")
        return float(v)

