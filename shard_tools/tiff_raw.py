"""Fast pixel reads of plain (uncompressed, striped) GeoTIFFs, which is what the upstream chips are.

GDAL decodes a pixel-interleaved file strip by strip into one block cache entry per band and strip, then copies the
bands out: for a 36-band 448x448 chip that is ~16,000 cache blocks and about four times the time of reading the
bytes. Here the strips are read straight into one buffer (a single ``readinto`` when they are contiguous, as GDAL and
libtiff write them) and de-interleaved with a cache-blocked numpy transpose. Only the pixel values come from here;
the metadata (band count and descriptions, bounds, CRS) still comes from rasterio. Anything else — compression, a
predictor, tiles, odd bit depths, strips that do not fit the file — returns ``None`` and the caller reads through
rasterio, which reports the precise problem for damaged files.

The TIFF tags are parsed here and only here (:func:`read_tags`): the GeoTIFF encoder in ``rasters`` reads the strip
layout of its GDAL-written templates through it.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from collections.abc import Sequence

import numpy as np

_TYPES = {1: "B", 2: "B", 3: "H", 4: "I", 5: "II", 6: "b", 7: "B", 8: "h", 9: "i", 10: "ii", 11: "f", 12: "d",
          16: "Q", 17: "q", 18: "Q"}
_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_WANTED = {256, 257, 258, 259, 273, 277, 278, 279, 284, 317, 322, 323, 339,
           33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113}  # GeoTIFF tags, GDAL_METADATA, GDAL_NODATA
_KIND = {1: "u", 2: "i", 3: "f"}  # SampleFormat -> numpy kind
TRANSPOSE_BLOCK = 1 << 18  # bytes of interleaved rows de-interleaved at a time (stays in L2)


class _Source:
    """Random access to a file path or an in-memory buffer."""

    def __init__(self, data: bytes | str):
        self.mem = None if isinstance(data, str) else memoryview(data)
        self.f = open(data, "rb") if isinstance(data, str) else None
        self.size = len(self.mem) if self.mem is not None else os.fstat(self._file().fileno()).st_size

    def _file(self) -> io.BufferedReader:
        if self.f is None:
            raise ValueError("an in-memory source has no file")
        return self.f

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise _Unsupported
        if self.mem is not None:
            return bytes(self.mem[offset: offset + n])
        f = self._file()
        f.seek(offset)
        b = f.read(n)
        if len(b) != n:
            raise _Unsupported
        return b

    def readinto(self, offset: int, out: memoryview) -> None:
        n = len(out)
        if offset < 0 or offset + n > self.size:
            raise _Unsupported
        if self.mem is not None:
            out[:] = self.mem[offset: offset + n]
            return
        f = self._file()
        f.seek(offset)
        if f.readinto(out) != n:
            raise _Unsupported

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class _Unsupported(ValueError):
    """Not a file of the plain kind read here (the caller reads it through GDAL)."""


def read_tags(data: bytes | str) -> tuple[str, dict[int, tuple], dict[int, int]]:
    """The byte order (``"<"`` or ``">"``), and the values and field types by tag, of the tags this module reads
    (image layout, georeferencing, GDAL metadata and nodata) in a TIFF or BigTIFF with a single IFD. ASCII values
    are one ``bytes``; others a tuple of numbers. Raises :class:`ValueError` (or ``struct.error`` for a truncated
    file) for anything else."""
    src = _Source(data)
    try:
        return _first_ifd(src)
    finally:
        src.close()


def _first_ifd(src: _Source) -> tuple[str, dict[int, tuple], dict[int, int]]:
    head = src.read(0, 16) if src.size >= 16 else src.read(0, 8)
    bo = {b"II": "<", b"MM": ">"}.get(head[:2])
    if bo is None:
        raise _Unsupported
    magic = struct.unpack(bo + "H", head[2:4])[0]
    if magic == 42:
        big, (ifd,) = False, struct.unpack(bo + "I", head[4:8])
        count_fmt, entry_size, value_room = "H", 12, 4
    elif magic == 43 and len(head) == 16:
        big, (ifd,) = True, struct.unpack(bo + "Q", head[8:16])
        count_fmt, entry_size, value_room = "Q", 20, 8
    else:
        raise _Unsupported
    csize = struct.calcsize(count_fmt)
    (n,) = struct.unpack(bo + count_fmt, src.read(ifd, csize))
    raw = src.read(ifd + csize, n * entry_size + value_room)
    if any(raw[n * entry_size:]):
        raise _Unsupported  # a second IFD: an internal mask or overviews, which GDAL reads
    tags: dict[int, tuple] = {}
    types: dict[int, int] = {}
    for i in range(n):
        e = raw[i * entry_size: (i + 1) * entry_size]
        tag, typ = struct.unpack(bo + "HH", e[:4])
        if tag not in _WANTED:
            continue
        if typ not in _TYPES or typ in (5, 10, 11):
            raise _Unsupported
        count = struct.unpack(bo + ("Q" if big else "I"), e[4: 4 + (8 if big else 4)])[0]
        nbytes = count * _SIZES[typ]
        field = e[entry_size - value_room:]
        if nbytes <= value_room:
            payload = field[:nbytes]
        else:
            (off,) = struct.unpack(bo + ("Q" if big else "I"), field)
            payload = src.read(off, nbytes)
        tags[tag] = (payload,) if typ == 2 else struct.unpack(f"{bo}{count}{_TYPES[typ]}", payload)
        types[tag] = typ
    return bo, tags, types


_local = threading.local()
SCRATCH_MAX = 64 << 20  # larger interleaved images get a buffer of their own


def _scratch(n: int) -> np.ndarray:
    if n > SCRATCH_MAX:
        return np.empty(n, dtype=np.uint8)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < n:
        buf = _local.buf = np.empty(n, dtype=np.uint8)
    return buf[:n]


def read_pixels(data: bytes | str, indexes: Sequence[int] | None = None) -> np.ndarray | None:
    """The (C, H, W) pixels of the first image of a plain GeoTIFF (``indexes``: 0-based bands to keep), in native
    byte order and C order; ``None`` when the file is not plain uncompressed strips (read it with rasterio)."""
    try:
        src = _Source(data)
    except OSError:
        return None
    try:
        return _read(src, indexes)
    except (_Unsupported, struct.error, ValueError, OverflowError, MemoryError):
        return None
    finally:
        src.close()


def _read(src: _Source, indexes: Sequence[int] | None) -> np.ndarray:
    bo, t, _ = _first_ifd(src)
    return _pixels(src, bo, t, indexes)


def _layout(bo: str, t: dict[int, tuple]) -> tuple[int, int, int, np.dtype, int]:
    """(width, height, bands, dtype, planar configuration) of a plain uncompressed striped image."""
    one = lambda tag, default=None: (t[tag][0] if tag in t else default)  # noqa: E731
    if one(259, 1) != 1 or one(317, 1) != 1 or 322 in t or 323 in t or 273 not in t or 279 not in t:
        raise _Unsupported  # compressed, predictor, tiled, or no strips
    w, h, c = one(256), one(257), one(277, 1)
    bits, fmt = set(t.get(258, (1,))), set(t.get(339, (1,)))
    planar = one(284, 1)
    if not w or not h or len(bits) != 1 or len(fmt) != 1 or planar not in (1, 2):
        raise _Unsupported
    bits_, fmt_ = bits.pop(), fmt.pop()
    if bits_ not in (8, 16, 32, 64) or fmt_ not in _KIND or (fmt_ == 3 and bits_ < 32):
        raise _Unsupported
    return w, h, c, np.dtype(f"{bo}{_KIND[fmt_]}{bits_ // 8}"), planar


def _pixels(src: _Source, bo: str, t: dict[int, tuple], indexes: Sequence[int] | None) -> np.ndarray:
    w, h, c, dtype, planar = _layout(bo, t)
    one = lambda tag, default=None: (t[tag][0] if tag in t else default)  # noqa: E731
    rps = min(one(278, h) or h, h)
    per_plane = -(-h // rps)
    offsets, counts = t[273], t[279]
    planes = c if planar == 2 else 1
    if len(offsets) != per_plane * planes or len(counts) != len(offsets):
        raise _Unsupported
    row_bytes = w * (c if planar == 1 else 1) * dtype.itemsize
    plane_bytes = row_bytes * h
    # pixel-interleaved strips land in a per-thread scratch buffer (reused: no fresh pages to fault in per file)
    # and are de-interleaved into a new array; band-interleaved ones are read into the result directly
    buf = _scratch(plane_bytes) if planar == 1 else np.empty(plane_bytes * planes, dtype=np.uint8)
    view = buf.data
    strips = []
    for p in range(planes):
        for s in range(per_plane):
            rows = min(rps, h - s * rps)
            i = p * per_plane + s
            if counts[i] < rows * row_bytes:
                raise _Unsupported  # short strip: let GDAL name the problem
            strips.append((offsets[i], p * plane_bytes + s * rps * row_bytes, rows * row_bytes))
    # contiguous runs of strips are read at once
    k = 0
    while k < len(strips):
        off, dst, n = strips[k]
        j = k + 1
        while j < len(strips) and strips[j][0] == off + n and strips[j][1] == dst + n:
            n += strips[j][2]
            j += 1
        src.readinto(off, view[dst: dst + n])
        k = j
    pix = buf.view(dtype)
    keep = list(range(c)) if indexes is None else list(indexes)
    if any(not 0 <= b < c for b in keep):
        raise _Unsupported
    if planar == 2:
        out = pix.reshape(c, h, w)
        out = out if keep == list(range(c)) else out[keep]
    else:
        inter = pix.reshape(h, w, c)
        out = np.empty((len(keep), h, w), dtype=dtype)
        step = max(1, TRANSPOSE_BLOCK // row_bytes)
        sel = inter if keep == list(range(c)) else None
        for y in range(0, h, step):
            block = inter[y: y + step] if sel is not None else inter[y: y + step][:, :, keep]
            out[:, y: y + step] = block.transpose(2, 0, 1)
    if not dtype.isnative:
        out = out.astype(dtype.newbyteorder("="))
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------- GeoTIFF metadata of the plainest kind

# GeoKeys of a geographic WGS 84 (EPSG:4326) raster with pixel-is-area, as GDAL writes them; anything else (other
# keys, other values, a model transformation, non-zero tie-point pixel) is left to rasterio.
_GEOKEYS_4326 = {1024: 2, 1025: 1, 2048: 4326, 2054: 9102}
_GEOKEYS_DOUBLE = {2057: 6378137.0, 2059: 298.257223563}
_GEOKEYS_ANY = {2049}  # the citation text


class PlainGeoTiff:
    """Metadata and pixels of a plain uncompressed, striped GeoTIFF in EPSG:4326 (what the upstream chips are),
    read without GDAL. :func:`open_plain` returns ``None`` for anything else. The values match rasterio's:
    ``descriptions`` (None where a band has none), ``bounds`` (left, bottom, right, top), ``crs``."""

    def __init__(self, src: _Source, bo: str, tags: dict[int, tuple]):
        self._src, self._bo, self._tags = src, bo, tags
        self.width, self.height, self.count, dt, _ = _layout(bo, tags)
        self.dtype = dt.newbyteorder("=")
        self.crs = "EPSG:4326"
        self.bounds = _bounds(tags, self.width, self.height)
        self.descriptions = _descriptions(tags, self.count)
        self.nodata = _nodata(tags)

    def read(self, indexes: Sequence[int] | None = None) -> np.ndarray | None:
        try:
            return _pixels(self._src, self._bo, self._tags, indexes)
        except (_Unsupported, struct.error, ValueError, OverflowError, MemoryError):
            return None

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> PlainGeoTiff:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_plain(data: bytes | str) -> PlainGeoTiff | None:
    try:
        src = _Source(data)
    except OSError:
        return None
    try:
        bo, tags, _ = _first_ifd(src)
        return PlainGeoTiff(src, bo, tags)
    except (_Unsupported, struct.error, ValueError, OverflowError, MemoryError, UnicodeDecodeError):
        src.close()
        return None


def _bounds(t: dict[int, tuple], w: int, h: int) -> tuple[float, float, float, float]:
    if 34264 in t or 33550 not in t or 33922 not in t or 34735 not in t:
        raise _Unsupported
    keys = t[34735]
    if keys[:3] != (1, 1, 0) or len(keys) != 4 + 4 * keys[3]:
        raise _Unsupported
    doubles = t.get(34736, ())
    seen = set()
    for i in range(keys[3]):
        key, loc, count, value = keys[4 + 4 * i: 8 + 4 * i]
        seen.add(key)
        if key in _GEOKEYS_4326:
            if loc != 0 or value != _GEOKEYS_4326[key]:
                raise _Unsupported
        elif key in _GEOKEYS_DOUBLE:
            if loc != 34736 or count != 1 or value >= len(doubles) or doubles[value] != _GEOKEYS_DOUBLE[key]:
                raise _Unsupported
        elif key not in _GEOKEYS_ANY:
            raise _Unsupported
    if not {1024, 2048} <= seen:
        raise _Unsupported
    tie, scale = t[33922], t[33550]
    if len(tie) != 6 or len(scale) < 2 or tie[0] != 0 or tie[1] != 0 or not scale[0] > 0 or not scale[1] > 0:
        raise _Unsupported
    # GDAL: geotransform (x0, sx, 0, y0, 0, -sy); rasterio: bounds from the affine transform
    a, c, e, f = float(scale[0]), float(tie[3]), -float(scale[1]), float(tie[4])
    return (c, f + e * h, c + a * w, f)


def _nodata(t: dict[int, tuple]) -> float | None:
    """The GDAL_NODATA tag as rasterio reports it (a float; None when absent)."""
    if 42113 not in t:
        return None
    text = t[42113][0].rstrip(b"\0").decode("ascii").strip()
    try:
        return float(text)
    except ValueError:
        raise _Unsupported from None


def _descriptions(t: dict[int, tuple], count: int) -> list[str | None]:
    out: list[str | None] = [None] * count
    if 42112 not in t:
        return out
    import xml.etree.ElementTree as ET

    root = ET.fromstring(t[42112][0].rstrip(b"\0").decode("utf-8"))
    if root.tag != "GDALMetadata":
        raise _Unsupported
    for item in root:
        if item.tag != "Item":
            raise _Unsupported
        if item.get("role") != "description":
            continue
        sample, text = item.get("sample"), item.text or ""
        # GDAL unescapes these values once more than XML does ("&amp;amp;" reads as "&"): leave escapes to GDAL
        if item.get("name") != "DESCRIPTION" or sample is None or len(item) or text != text.strip() or "&" in text:
            raise _Unsupported
        b = int(sample)
        if not 0 <= b < count or item.get("domain"):
            raise _Unsupported
        out[b] = text or None
    return out
