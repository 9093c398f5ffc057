"""Storing a modality below its canonical size (``m3leo-shards build --resolution MOD=PX``): an exact reduction by
an integer factor, each ``factor × factor`` block of the canonical grid becoming one stored pixel.

The rule follows each band's kind in the registry and only valid pixels take part (the stored nodata and NaN are
left out; a block without any valid pixel becomes nodata):

- ``sar_db``: the mean of linear power, ``10 log10(mean(10^(dB/10)))``. Averaging the dB values themselves would be
  the geometric mean of the power, biased low wherever a block mixes bright and dark scatterers (a 0 dB and a
  -20 dB pixel give -10 dB, not -3 dB); a coarser sensor pixel, or multilooking, averages power.
- ``optical``, ``coherence``, ``continuous``: the mean.
- ``phase``: the circular mean, ``atan2(mean sin, mean cos)``, placed at the 2π level of the block's first valid
  pixel (raster order) — values near ±π give ±π, not 0, and unwrapped phase stays unwrapped (within π of the
  block's own values), so per-chip re-referencing still works.
- ``categorical``: the most frequent valid code, ties to the smallest code.
- Modalities with special codes (MODIS' 200 = water): a block takes the most frequent special code when it has more
  pixels than the ordinary valid ones together (ties to the ordinary mean), else the mean of the ordinary pixels.

Means are computed in float64 (integer sums exactly) and rounded half to even (``np.rint``) for integer stored
dtypes, so a result never leaves the range of the block's valid values: it cannot become a nodata value below or
above them, and a clash with a nodata or special code inside that range is an error, never silent. Everything is
numpy reshapes over the block axes, no per-pixel loop. The same input gives the same bytes; ``sar_db`` and
``phase`` go through ``exp``/``log``/``sin``/``cos``, whose last bit may differ between numpy builds or CPUs, so a
value exactly half-way between two stored steps could round differently on another machine (the other kinds are
exact).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from m3leo_stream.modalities import CHIP_SIZE_M, Modality

RULES = {
    "sar_db": "mean of linear power 10^(dB/10) over valid pixels, back to dB",
    "optical": "mean over valid pixels",
    "coherence": "mean over valid pixels",
    "continuous": "mean over valid pixels",
    "phase": "circular mean atan2(mean sin, mean cos) over valid pixels, at the 2 pi level of the block's first "
             "valid pixel",
    "categorical": "most frequent valid code, ties to the smallest code",
}
SPECIAL_RULE = ("the most frequent special code when it outnumbers the block's ordinary valid pixels, else the "
                "mean of the ordinary ones")
MANIFEST_KEY = "downsampled"
"""Key of a downsampled modality's manifest entry (and plan entry) that records where it came from."""


def allowed_sizes(px: int) -> list[int]:
    """Sizes a modality of canonical side ``px`` can be stored at: the divisors of ``px``, largest first."""
    return [d for d in range(px, 0, -1) if px % d == 0]


def parse_resolutions(values: Iterable[str] | None) -> dict[str, int]:
    """``["s1grd=224", "s2rgbm=224"]`` as ``{"s1grd": 224, "s2rgbm": 224}``, with one clear error line."""
    out: dict[str, int] = {}
    for v in values or ():
        name, sep, px = (t.strip() for t in v.partition("="))
        if not sep or not name or not px:
            raise ValueError(f"--resolution expects MODALITY=PX (e.g. s1grd=224), got {v!r}")
        try:
            n = int(px)
        except ValueError:
            raise ValueError(f"--resolution {v}: {px!r} is not a whole number of pixels") from None
        if name in out and out[name] != n:
            raise ValueError(f"--resolution given twice for {name} ({out[name]} and {n})")
        out[name] = n
    return out


def check_resolutions(resolutions: Mapping[str, int], modalities: Mapping[str, Modality],
                      selected: Sequence[str] | None = None) -> dict[str, int]:
    """Validate ``resolutions`` against the registry entries ``modalities``; return those that reduce (factor > 1).

    ``selected`` is the ``--modalities`` restriction (None: all). Raises :class:`ValueError` naming the modality and
    the sizes it allows."""
    out: dict[str, int] = {}
    for name, px in sorted(resolutions.items()):
        if name not in modalities:
            raise ValueError(f"--resolution {name}={px}: unknown modality {name!r}; known: {', '.join(modalities)}")
        if selected is not None and name not in selected:
            raise ValueError(f"--resolution {name}={px}: {name} is not among the modalities built "
                             f"(--modalities {','.join(selected)})")
        m = modalities[name]
        canon = m.canonical_px
        sizes = ", ".join(map(str, allowed_sizes(canon)))
        if isinstance(px, bool) or not isinstance(px, (int, np.integer)) or px < 1:
            raise ValueError(f"--resolution {name}={px}: give a positive whole number of pixels; {name} "
                             f"(canonical {canon} px) can be stored at {sizes}")
        if px > canon:
            raise ValueError(f"--resolution {name}={px}: {px} px would upsample {name} (canonical {canon} px); "
                             f"allowed sizes: {sizes}")
        if canon % px:
            raise ValueError(f"--resolution {name}={px}: {canon} px ({name}'s canonical size) is not a whole "
                             f"multiple of {px}; allowed sizes: {sizes}")
        if px < canon:
            out[name] = int(px)
    return out


def reduced(m: Modality, px: int) -> Modality:
    """The registry entry of ``m`` stored at ``px`` per side: ``resolution_m = 4480 / px``, so its
    ``canonical_px`` and ``shape`` are the stored ones and every reader follows from the manifest unchanged."""
    if px == m.canonical_px:
        return m
    out = dataclasses.replace(m, resolution_m=CHIP_SIZE_M / px)
    assert out.canonical_px == px, (m.name, px, out.canonical_px)
    return out


def stored_entries(modalities: Iterable[Modality], resolutions: Mapping[str, int]) -> dict[str, Modality]:
    """Name → the registry entry as stored: those in ``resolutions`` at that px (:func:`reduced`), the rest as is."""
    return {m.name: reduced(m, resolutions[m.name]) if m.name in resolutions else m for m in modalities}


def entry_json(m: Modality, downsampled: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``m``'s entry as the plan and the manifest write it: the registry fields, and its :func:`provenance` under
    :data:`MANIFEST_KEY` when ``downsampled`` has one for it."""
    extra = {MANIFEST_KEY: downsampled[m.name]} if m.name in downsampled else {}
    return {**m.to_json(), **extra}


def provenance(m: Modality, px: int) -> dict[str, Any]:
    """What the manifest records about a modality stored at ``px`` instead of its canonical size."""
    kinds = dict.fromkeys("categorical" if m.is_categorical else k for k in m.band_kinds)
    rules = {k: RULES[k] for k in kinds}
    if m.special_values:
        rules["special codes"] = SPECIAL_RULE
    rounding = (f"computed in float64, rounded half to even to {m.dtype}" if m.np_dtype.kind in "iu"
                else f"computed in float64, stored as {m.dtype}")
    return {
        "from_resolution_m": m.resolution_m, "from_px": m.canonical_px, "px": px, "factor": m.canonical_px // px,
        "method": "block reduction over valid pixels (a block without one is nodata)", "rules": rules,
        "rounding": rounding,
    }


# ---------------------------------------------------------------------------------------------------------------


def _blocks(a: np.ndarray, f: int) -> np.ndarray:
    """(C, H, W) as (C, H/f, W/f, f*f): each block's pixels on the last axis, in raster order."""
    c, h, w = a.shape
    return a.reshape(c, h // f, f, w // f, f).transpose(0, 1, 3, 2, 4).reshape(c, h // f, w // f, f * f)


def _sum(a: np.ndarray, f: int, dtype: Any) -> np.ndarray:
    """Block sums in ``dtype``, added in a fixed order (block position by position: strided slices, which is
    several times faster than summing reshaped block axes)."""
    c, h, w = a.shape
    out = np.zeros((c, h // f, w // f), dtype)
    for i in range(f):
        for j in range(f):
            out += a[:, i::f, j::f]
    return out


def _count_dtype(f: int) -> type:
    return np.int16 if f * f < 2**15 else np.int32


def _int_sum_dtype(dtype: np.dtype, f: int) -> type:
    """An accumulator that holds any block sum of ``dtype`` values exactly."""
    info = np.iinfo(dtype)
    return np.int32 if max(-int(info.min), int(info.max)) * f * f < 2**31 else np.int64


def _mean(a: np.ndarray, valid: np.ndarray, f: int, nodata: float | int | None) -> tuple[np.ndarray, np.ndarray]:
    """Block means over valid pixels (float64; NaN where none) and valid counts."""
    count = _sum(valid, f, _count_dtype(f))
    if a.dtype.kind in "iu":
        if nodata == 0 or valid.all():  # invalid pixels (if any) add 0
            total = _sum(a, f, _int_sum_dtype(a.dtype, f))
        elif nodata is not None:  # exact, without a masked copy: the invalid pixels all hold ``nodata``
            total = _sum(a, f, np.int64) - np.int64(nodata) * (f * f - count.astype(np.int64))
        else:
            total = _sum(np.where(valid, a, 0), f, np.int64)
    else:
        total = _sum(np.where(valid, a, 0.0), f, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count, count


@functools.lru_cache(maxsize=16)
def _power_table(dtype: str, scale: float, nodata: int | None) -> np.ndarray:
    """Linear power ``10^(v × scale / 10)`` of every value ``v`` of an 8/16-bit integer dtype, indexed by the bit
    pattern read as unsigned; 0 at ``nodata`` (so that nodata adds nothing to a block's sum)."""
    dt = np.dtype(dtype)
    info = np.iinfo(dt)
    values = np.arange(int(info.min), int(info.max) + 1, dtype=np.int64).astype(dt)
    table = np.empty(values.size, np.float64)
    table[values.view(f"u{dt.itemsize}")] = np.power(10.0, values.astype(np.float64) * (scale / 10.0))
    if nodata is not None:
        table[np.asarray(nodata, dt).view(f"u{dt.itemsize}")] = 0.0
    return table


def _mean_power(a: np.ndarray, valid: np.ndarray, f: int, scale: Sequence[float],
                nodata: float | int | None) -> np.ndarray:
    """Block means of linear power of dB values ``a × scale``, back in stored units (NaN where no valid pixel)."""
    count = _sum(valid, f, _count_dtype(f))
    power = np.empty(a.shape, np.float64)
    table_ok = a.dtype.kind in "iu" and a.dtype.itemsize <= 2
    for b, sc in enumerate(scale):
        if table_ok and (nodata is not None or valid[b].all()):
            nd = int(nodata) if nodata is not None and np.can_cast(np.min_scalar_type(nodata), a.dtype) else None
            np.take(_power_table(a.dtype.name, float(sc), nd), a[b].view(f"u{a.dtype.itemsize}"), out=power[b])
            if nd is None and not valid[b].all():
                power[b][~valid[b]] = 0.0
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                np.power(10.0, a[b].astype(np.float64) * (float(sc) / 10.0), out=power[b])
            power[b][~valid[b]] = 0.0
    scales = np.asarray(scale, np.float64)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = _sum(power, f, np.float64) / count
        return 10.0 * np.log10(mean) / scales


def _circular_mean(a: np.ndarray, valid: np.ndarray, f: int) -> np.ndarray:
    """Block circular means at the 2π level of each block's first valid pixel (NaN where no valid pixel)."""
    vals = _blocks(a.astype(np.float64), f)
    ok = _blocks(valid, f)
    first = np.take_along_axis(vals, ok.argmax(axis=-1)[..., None], axis=-1)
    d = np.where(ok, vals - first, 0.0)
    s = np.where(ok, np.sin(d), 0.0).sum(axis=-1)
    c = np.where(ok, np.cos(d), 0.0).sum(axis=-1)
    out = first[..., 0] + np.arctan2(s, c)
    out[~ok.any(axis=-1)] = np.nan
    return out


def _mode(a: np.ndarray, valid: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Most frequent valid value of each block (ties: the smallest) and whether the block has one."""
    vals = _blocks(a, f)
    ok = _blocks(valid, f)
    order = np.lexsort((vals, ~ok), axis=-1)  # valid first, ascending; invalid last
    s = np.take_along_axis(vals, order, axis=-1)
    sok = np.take_along_axis(ok, order, axis=-1)
    n = s.shape[-1]
    idx = np.arange(n)
    new = np.ones(s.shape, bool)
    new[..., 1:] = (s[..., 1:] != s[..., :-1]) | (sok[..., 1:] != sok[..., :-1])
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=-1)
    # run length at each position = position of the next run start - this run's start
    nxt = np.where(np.concatenate([new[..., 1:], np.ones((*s.shape[:-1], 1), bool)], axis=-1), idx + 1, n)
    end = np.minimum.accumulate(nxt[..., ::-1], axis=-1)[..., ::-1]
    length = np.where(sok, end - start, -1)
    best = length.argmax(axis=-1)  # first maximum: the smallest value among the most frequent
    return np.take_along_axis(s, best[..., None], axis=-1)[..., 0], np.asarray(ok.any(axis=-1))


def _to_dtype(values: np.ndarray, has: np.ndarray, dtype: np.dtype, nodata: float | int | None) -> np.ndarray:
    """Float block results (a temporary, overwritten) onto the stored dtype; blocks without a valid pixel get
    ``nodata``."""
    full = bool(has.all())
    if dtype.kind in "iu":
        if not full:
            values[~has] = 0.0
        out = np.rint(values, out=values).astype(dtype)
    else:
        out = values.astype(dtype)
    if not full:
        out[~has] = nodata
    return out


def block_reduce(m: Modality, array: np.ndarray, factor: int) -> np.ndarray:
    """``array`` (C, H, W) of modality ``m`` reduced by ``factor`` per side (see the module docstring); same dtype.

    Raises :class:`ValueError` when the shape is not divisible or a mean lands on a value reserved for nodata or a
    special code."""
    if factor == 1:
        return array
    c, h, w = array.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"{m.name}: a {h}x{w} array cannot be reduced by {factor}")
    dtype = array.dtype
    valid = ~m.is_nodata(array)
    special = sorted(m.special_values) if m.special_values else []
    out = np.empty((c, h // factor, w // factor), dtype)
    kinds = ["categorical" if m.is_categorical else k for k in m.band_kinds]
    for kind in dict.fromkeys(kinds):
        listed = [i for i, k in enumerate(kinds) if k == kind]
        bands: list[int] | slice = listed
        if listed == list(range(listed[0], listed[-1] + 1)):
            bands = slice(listed[0], listed[-1] + 1)  # a view, not a copy
        a, ok = array[bands], valid[bands]
        if kind == "categorical":
            vals, has = _mode(a, ok, factor)
            if not has.all():
                vals[~has] = m.nodata
            out[bands] = vals
            continue
        ordinary = ok
        if special:
            ordinary = ok & ~np.isin(a, special)
        if kind == "sar_db":
            nd = m.nodata if ordinary is ok and isinstance(m.nodata, (int, np.integer)) else None
            vals = _mean_power(a, ordinary, factor, np.asarray(m.scale)[bands].tolist(), nd)
            has = _sum(ordinary, factor, _count_dtype(factor)) > 0
        elif kind == "phase":
            vals = _circular_mean(a, ordinary, factor)
            has = _sum(ordinary, factor, _count_dtype(factor)) > 0
        else:
            nd = m.nodata if ordinary is ok and isinstance(m.nodata, (int, np.integer)) else None
            vals, count = _mean(a, ordinary, factor, nd)
            has = count > 0
        red = _to_dtype(vals, has, dtype, m.nodata)
        take = np.zeros(red.shape, bool)
        if special:
            n_ord = _sum(ordinary, factor, np.int64)
            best_n = np.zeros(red.shape, np.int64)
            best = np.zeros(red.shape, dtype)
            for code in special:  # ascending: ties between special codes go to the smallest
                n = _sum(ok & (a == code), factor, np.int64)
                win = n > best_n
                best_n = np.where(win, n, best_n)
                best = np.where(win, np.asarray(code, dtype), best)
            take = best_n > n_ord
        clash = m.is_nodata(red)
        for code in special:
            clash |= red == code
        clash &= has & ~take
        if clash.any():
            raise ValueError(f"{m.name}: {int(clash.sum())} block means round to a value reserved for nodata or a "
                             f"special code ({m.nodata}, {special}); this modality cannot be downsampled exactly")
        out[bands] = np.where(take, best, red) if special else red
    return out
