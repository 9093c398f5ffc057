"""From a decoded source file to the member that is stored: the registry's source encodings applied, nodata
carried through, resampled onto the canonical grid, and all-nodata bands named.

The registry (:class:`m3leo_stream.modalities.SourceEncoding`) says how each exporter wrote a modality; this module
applies it. Anything that would change values silently — a dtype no encoding maps, values outside the stored range,
a nodata tag that is a valid class code, nodata pixels where the modality has no nodata value — is a
:class:`ChipDataError` naming the file and chip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from m3leo_stream.modalities import Modality, SourceEncoding, is_nan, nodata_value
from shard_tools.rasters import ChipDataError, Decoded, resample


class EmptyMember(ChipDataError):
    """Every pixel of the member is nodata: the chip is kept without it (as when the file is absent)."""


@dataclass
class Stored:
    """A member ready to store, with what was done to it."""

    array: np.ndarray  # registry shape and dtype
    encoding: SourceEncoding
    resampling: str | None  # None, "bilinear", "nearest", or "bilinear+nearest" (categorical bands nearest)
    missing_bands: list[str] = field(default_factory=list)  # bands with no valid pixel (missing season, month...)
    source_nodata: int = 0  # source pixels that were nodata (before resampling)


def source_invalid(m: Modality, enc: SourceEncoding, dec: Decoded, where: str, chip: str) -> np.ndarray | None:
    """(C, H, W) bool of source pixels that hold no data, or None when every pixel holds data."""
    src = dec.array
    tag = nodata_value(dec.nodata)  # NaN marks nothing here: float sources are checked with isnan below
    if tag is not None:
        if m.is_categorical and int(tag) in m.class_codes:
            raise ChipDataError(where, chip, f"the file's nodata tag {tag} is class code {int(tag)} of {m.name}; "
                                             "reading it as nodata would erase that class")
        if m.special_values and int(tag) in m.special_values:
            raise ChipDataError(where, chip, f"the file's nodata tag {tag} is the special value "
                                             f"{m.special_values[int(tag)]!r} of {m.name}")
    bad = None
    if src.dtype.kind == "f":
        bad = np.isnan(src)
    for value in (nodata_value(enc.nodata), tag):
        if value is None:
            continue
        if src.dtype.kind in "iu" and not float(value).is_integer():
            continue  # a fractional tag on an integer file marks nothing
        hit = src == value
        bad = hit if bad is None else bad | hit
    if dec.valid is not None:
        bad = ~dec.valid if bad is None else bad | ~dec.valid
    return bad if bad is not None and bad.any() else None


def _same(a: float | int | None, b: float | int | None) -> bool:
    return a == b or (is_nan(a) and is_nan(b))


def _as_stored(m: Modality, enc: SourceEncoding, dec: Decoded) -> bool:
    """The file holds stored values with the stored nodata already: nothing to map (no copy, no mask pass)."""
    return (enc.is_identity and dec.array.dtype == m.np_dtype and _same(enc.nodata, m.nodata)
            and (dec.nodata is None or _same(dec.nodata, m.nodata)) and dec.valid is None
            and (dec.array.dtype.kind != "f" or is_nan(m.nodata)))


def _out_of_range(m: Modality, enc: SourceEncoding, lo: float, hi: float, where: str, chip: str) -> ChipDataError:
    return ChipDataError(where, chip, f"values {(lo - enc.offset) / enc.gain:g}..{(hi - enc.offset) / enc.gain:g} do "
                                      f"not fit {m.name}'s stored {m.dtype} under encoding {enc.name!r}: the file is "
                                      "not in that encoding")


def _apply(m: Modality, enc: SourceEncoding, src: np.ndarray, invalid: np.ndarray | None, where: str,
           chip: str) -> tuple[np.ndarray, bool]:
    """The source values in stored units and dtype, and whether a valid value can equal the stored nodata; invalid
    pixels are not checked (they are overwritten)."""
    out = m.np_dtype
    values = src.view(enc.view) if enc.view else src
    if enc.is_identity:
        if values.dtype == out:
            return values, True
        if out.kind in "iu" and not np.can_cast(values.dtype, out, "safe"):
            raise ChipDataError(where, chip, f"encoding {enc.name!r} of {m.name}: {values.dtype} to {out} is lossy")
        return values.astype(out), True
    info = np.iinfo(out) if out.kind in "iu" else None
    if info is not None and values.dtype.kind in "iu" and float(enc.gain).is_integer() \
            and float(enc.offset).is_integer():
        # integer to integer (geetiles' wrapped uint16 dB): exact in the stored dtype once the range is known
        lo, hi = sorted(int(v) * int(enc.gain) + int(enc.offset) for v in (values.min(), values.max()))
        if lo >= info.min and hi <= info.max:
            a = values.astype(out)
            a *= out.type(enc.gain)
            if enc.offset:
                a += out.type(enc.offset)
            nd = nodata_value(m.nodata)
            return a, nd is not None and lo <= nd <= hi
    f = values.astype(np.float64)
    f *= enc.gain
    f += enc.offset
    if out.kind in "iu":
        np.rint(f, out=f)
        info = np.iinfo(out)
        check = f if invalid is None else f[~invalid]
        if check.size and (check.min() < info.min or check.max() > info.max):
            raise _out_of_range(m, enc, float(check.min()), float(check.max()), where, chip)
        if invalid is not None:
            f[invalid] = 0  # overwritten with the stored nodata by the caller; NaN has no integer value
    return f.astype(out), True


def _resample_bands(m: Modality, array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Onto the canonical grid: categorical modalities, special codes and categorical bands nearest, the rest
    bilinear over valid pixels."""
    if array.shape[1:] == m.shape[1:]:
        return array, None
    if m.is_categorical or m.special_values:
        return resample(array, m.shape[1:], True, m.nodata, "nearest"), "nearest"
    nearest = [i for i, k in enumerate(m.band_kinds) if k == "categorical"]
    if not nearest:
        return resample(array, m.shape[1:], False, m.nodata, "bilinear"), "bilinear"
    out = np.empty((array.shape[0], *m.shape[1:]), array.dtype)
    rest = [i for i in range(array.shape[0]) if i not in nearest]
    out[nearest] = resample(array[nearest], m.shape[1:], True, m.nodata, "nearest")
    if rest:
        out[rest] = resample(array[rest], m.shape[1:], False, m.nodata, "bilinear")
    return out, "bilinear+nearest"


def to_stored(m: Modality, dec: Decoded, where: str, chip: str) -> Stored:
    """Map a decoded file onto the stored member of ``m`` (see the module docstring)."""
    src = dec.array
    enc = m.encoding_for(src.dtype)
    if enc is None:
        raise ChipDataError(where, chip, f"dtype {src.dtype} cannot be stored as {m.dtype} (modality {m.name}) "
                                         f"without loss; known source encodings: {', '.join(m.accepted_dtypes())} "
                                         "(declare another under 'encodings:' in a modalities YAML)")
    invalid = None if _as_stored(m, enc, dec) else source_invalid(m, enc, dec, where, chip)
    array, may_clash = _apply(m, enc, src, invalid, where, chip)
    n_invalid = 0
    nd = m.nodata
    if invalid is not None:
        n_invalid = int(invalid.sum())
        if nd is None:
            raise ChipDataError(where, chip, f"{n_invalid} pixels are nodata in the file, but modality {m.name} "
                                             "has no nodata value to store them as")
        if np.may_share_memory(array, src):
            array = array.copy()
        array[invalid] = nd
    if may_clash and nodata_value(nd) is not None and not (enc.is_identity and enc.nodata == nd):
        clash = array == nd
        if invalid is not None:
            clash &= ~invalid
        if clash.any():
            raise ChipDataError(where, chip, f"{int(clash.sum())} valid pixels equal {m.name}'s stored nodata {nd} "
                                             f"under encoding {enc.name!r}")
    array, method = _resample_bands(m, array)
    missing = _missing_bands(m, array)
    if len(missing) == len(m.bands):
        raise EmptyMember(where, chip, "all pixels are nodata")
    return Stored(array, enc, method, missing, n_invalid)


def _missing_bands(m: Modality, array: np.ndarray) -> list[str]:
    """Bands of the chip without a valid pixel; cheap when the first pixel of every band holds data."""
    if not m.is_nodata(array[:, 0, 0]).any():
        return []
    empty = np.asarray(m.is_nodata(array).all(axis=(1, 2)))
    return [b for b, e in zip(m.bands, empty.tolist()) if e]
