"""Encoding and decoding of the upstream chip files (GeoTIFF and NetCDF) in memory, and resampling onto the
canonical grid of a modality. Shared by ``synth``, ``build`` and ``ingest-raster``."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3leo_stream.modalities import Modality, is_nan, nodata_value
from shard_tools.tiff_raw import open_plain, read_pixels, read_tags


class ChipDataError(ValueError):
    """Invalid data in one chip file: names the file, the chip and what was wrong."""

    def __init__(self, where: str, chip: str, what: str):
        super().__init__(f"{where} (chip {chip}): {what}")
        self.where, self.chip, self.what = where, chip, what


# ---------------------------------------------------------------- encoding (synth, ingest)


def geotiff_bytes(
    array: np.ndarray,
    bounds: tuple[float, float, float, float],
    crs: str = "EPSG:4326",
    nodata: float | int | None = None,
    descriptions: Sequence[str] | None = None,
    compress: str | None = None,
) -> bytes:
    """A real GeoTIFF of a (C,H,W) array covering ``bounds`` in ``crs``."""
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.transform import from_bounds

    c, h, w = array.shape
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": w, "height": h, "count": c, "dtype": array.dtype.name, "crs": crs,
        "transform": from_bounds(*bounds, w, h),
    }
    if nodata is not None:
        profile["nodata"] = nodata
    if compress:
        profile["compress"] = compress
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(array)
            for i, d in enumerate(descriptions or ()):
                dst.set_band_description(i + 1, d)
        return bytes(mem.getbuffer())


class GeoTiffEncoder:
    """Encodes many chips of one shape, dtype, CRS, nodata and band descriptions into GeoTIFF bytes identical to
    :func:`geotiff_bytes`, without GDAL per chip: GDAL writes a template once, and each chip is the template's bytes
    with the chip's pixel scale and tie point patched in and its pixels in place of the template's strips.

    GDAL skips writing strips that are entirely zero or nodata and appends them when the file is closed, so the
    layout depends on which strips are such: for integer dtypes one template is made per pattern of zero/nodata
    strips (a chip at a raster's edge shares its pattern with its row of chips); float chips with such strips, and
    compressed files, are encoded by GDAL. Every template is checked once, byte for byte, against GDAL's encoding of
    other values and bounds; where they differ GDAL encodes those chips."""

    TEMPLATE_BOUNDS = (1.2345678901, -2.3456789012, 1.2789012345, -2.3012345678)  # distinctive doubles
    PROBE_BOUNDS = (6.123456789, -0.98765, 6.1650001, -0.9469)
    PIXEL_SCALE, TIEPOINT, STRIP_OFFSETS, STRIP_BYTES, PLANAR, ROWS_PER_STRIP = 33550, 33922, 273, 279, 284, 278
    MAX_LAYOUTS = 64

    def __init__(self, shape: tuple[int, int, int], dtype: Any, crs: str = "EPSG:4326",
                 nodata: float | int | None = None, descriptions: Sequence[str] | None = None,
                 compress: str | None = None):
        import threading

        self.shape, self.dtype, self.crs = tuple(shape), np.dtype(dtype), crs
        self.nodata, self.descriptions, self.compress = nodata, list(descriptions) if descriptions else None, compress
        self.fill = 1 if nodata != 1 else 2  # template value: neither zero nor nodata
        self.layouts: dict[tuple[int, ...], _TiffLayout | None] = {}
        self.lock = threading.Lock()
        self.rows = self.planar = 0
        self.exact = False
        if compress or self.dtype.byteorder == ">":
            return
        try:
            self._strip_geometry(geotiff_bytes(np.full(self.shape, self.fill, self.dtype), self.TEMPLATE_BOUNDS, crs,
                                               nodata, self.descriptions))
        except (ValueError, KeyError, struct.error):
            return
        self.exact = self._layout((0,) * self.n_strips) is not None

    # -- strips

    def _strip_geometry(self, tif: bytes) -> None:
        tags, _ = _template_tags(tif)
        c, h, w = self.shape
        self.planar = tags[self.PLANAR][0] if self.PLANAR in tags else 1
        self.rows = tags[self.ROWS_PER_STRIP][0] if self.ROWS_PER_STRIP in tags else h
        self.per_band = -(-h // self.rows)
        self.n_strips = self.per_band * (c if self.planar == 2 else 1)

    def _states(self, array: np.ndarray) -> tuple[int, ...] | None:
        """Per strip: 0 plain, 1 all zero bytes, 2 all nodata; None when a float chip has such a strip."""
        c, h, _ = self.shape

        def per_strip(row_flags: np.ndarray) -> np.ndarray:  # (c, h) → (strips,)
            if self.planar != 2:
                row_flags = np.asarray(row_flags.all(axis=0, keepdims=True))  # a strip holds these rows of every band
            padded = np.ones((row_flags.shape[0], self.per_band * self.rows), bool)
            padded[:, :h] = row_flags
            return padded.reshape(row_flags.shape[0], self.per_band, self.rows).all(axis=2).ravel()

        states = per_strip(np.asarray(~array.view(np.uint8).reshape(c, h, -1).any(axis=2))).astype(np.int8)
        nd = self.nodata
        if nd is not None and not (self.dtype.kind in "iu" and nd == 0):
            is_nd = np.isnan(array) if is_nan(nd) else array == nd
            states[per_strip(is_nd.all(axis=2)) & (states == 0)] = 2
        if self.dtype.kind == "f" and states.any():
            return None  # NaN payloads and -0.0: GDAL's fill bytes need not be the chip's
        return tuple(states.tolist())

    def _layout(self, states: tuple[int, ...]) -> _TiffLayout | None:
        with self.lock:
            if states in self.layouts:
                return self.layouts[states]
            if len(self.layouts) >= self.MAX_LAYOUTS:
                return None
            layout = None
            try:
                layout = self._make_layout(states)
            except (ValueError, KeyError, struct.error):
                pass
            self.layouts[states] = layout
            return layout

    def _pattern(self, states: tuple[int, ...], plain: np.ndarray) -> np.ndarray:
        """``plain`` with the zero / nodata strips of ``states`` set."""
        a = plain.copy()
        for k, st in enumerate(states):
            if st:
                band, j = divmod(k, self.per_band)
                rows = slice(j * self.rows, (j + 1) * self.rows)
                target = a[band, rows] if self.planar == 2 else a[:, rows]
                target[...] = 0 if st == 1 else self.nodata
        return a

    def _make_layout(self, states: tuple[int, ...]) -> _TiffLayout | None:
        tif = geotiff_bytes(self._pattern(states, np.full(self.shape, self.fill, self.dtype)), self.TEMPLATE_BOUNDS,
                            self.crs, self.nodata, self.descriptions)
        tags, types = _template_tags(tif)
        offsets, sizes = tags[self.STRIP_OFFSETS], tags[self.STRIP_BYTES]
        c, h, w = self.shape
        row_bytes = w * self.dtype.itemsize * (1 if self.planar == 2 else c)
        true = [min(self.rows, h - j * self.rows) * row_bytes for j in range(self.per_band)]
        true *= self.n_strips // self.per_band
        if len(offsets) != self.n_strips or any(s < t for s, t in zip(sizes, true)):
            raise ValueError("unexpected strips")
        if any(types[t] != 12 for t in (self.PIXEL_SCALE, self.TIEPOINT)):
            raise ValueError("unexpected georeferencing tags")
        t = _bounds_transform(self.TEMPLATE_BOUNDS, self.shape)
        patches = []
        for key, values in (("scale", (t.a, -t.e)), ("origin", (t.c, t.f))):
            at = [m.start() for m in re.finditer(re.escape(struct.pack("<2d", *values)), tif)]
            if not at:
                raise ValueError("georeferencing not found in the template")
            patches += [(key, p) for p in at]
        starts = np.concatenate([[0], np.cumsum(true)]).tolist()
        layout = _TiffLayout(tif, [(offsets[k], starts[k], true[k]) for k in range(self.n_strips)], patches)
        plain = np.random.default_rng(0).integers(1, 100, self.shape).astype(self.dtype)
        plain[plain == (self.nodata if self.nodata is not None else 0)] = self.fill
        probe = self._pattern(states, plain)
        want = geotiff_bytes(probe, self.PROBE_BOUNDS, self.crs, self.nodata, self.descriptions)
        got = b"".join(bytes(p) for p in layout.parts(self._pixels(probe), _bounds_transform(self.PROBE_BOUNDS,
                                                                                              self.shape)))
        return layout if got == want else None

    def _pixels(self, array: np.ndarray) -> memoryview:
        """The pixels in the file's order (band after band, or interleaved)."""
        if self.planar == 2 or self.shape[0] == 1:
            pixels = np.ascontiguousarray(array)
        else:
            pixels = np.empty(self.shape[1:] + self.shape[:1], self.dtype)
            for i in range(self.shape[0]):
                pixels[:, :, i] = array[i]
        return pixels.data.cast("B")

    def parts(self, array: np.ndarray, bounds: tuple[float, float, float, float]) -> list[Any]:
        """The file as buffers to write one after the other."""
        if array.shape != self.shape or array.dtype != self.dtype:
            raise ValueError(f"array {array.shape} {array.dtype}, encoder for {self.shape} {self.dtype}")
        layout = None
        if self.exact:
            array = np.ascontiguousarray(array)
            states = self._states(array)
            layout = self._layout(states) if states is not None else None
        if layout is None:
            return [geotiff_bytes(array, bounds, self.crs, self.nodata, self.descriptions, self.compress)]
        return layout.parts(self._pixels(array), _bounds_transform(bounds, self.shape))


class _TiffLayout:
    """A GDAL-written template cut into the pieces around its strips: chips fill the strips and patch the
    georeferencing."""

    def __init__(self, tif: bytes, strips: list[tuple[int, int, int]], patches: list[tuple[str, int]]):
        # strips: (file offset, offset in the pixel buffer, length), merged where both run on
        runs: list[list[int]] = []
        for off, start, n in sorted(strips):
            if runs and runs[-1][0] + runs[-1][2] == off and runs[-1][1] + runs[-1][2] == start:
                runs[-1][2] += n
            else:
                runs.append([off, start, n])
        self.pieces: list[tuple[bytes, list[tuple[str, int]]]] = []  # template bytes, patches inside them
        self.order: list[Any] = []  # piece index (int) or (pixel start, length)
        pos = 0
        for off, start, n in runs + [[len(tif), 0, 0]]:
            piece = tif[pos:off]
            inside = [(k, p - pos) for k, p in patches if pos <= p and p + 16 <= off]
            self.order.append(len(self.pieces))
            self.pieces.append((piece, inside))
            if n:
                self.order.append((start, n))
            pos = off + n
        if sum(len(v) for _, v in self.pieces) != len(patches):
            raise ValueError("georeferencing overlaps the pixels")

    def parts(self, pixels: memoryview, t) -> list[Any]:
        values = {"scale": (t.a, -t.e), "origin": (t.c, t.f)}
        out: list[Any] = []
        for item in self.order:
            if isinstance(item, tuple):
                out.append(pixels[item[0]: item[0] + item[1]])
                continue
            piece, inside = self.pieces[item]
            if inside:
                piece = bytearray(piece)
                for key, p in inside:
                    struct.pack_into("<2d", piece, p, *values[key])
            if piece:
                out.append(piece)
        return out


def _bounds_transform(bounds: tuple[float, float, float, float], shape: tuple[int, ...]):
    from rasterio.transform import from_bounds

    return from_bounds(*bounds, shape[2], shape[1])


def _template_tags(tif: bytes) -> tuple[dict[int, tuple], dict[int, int]]:
    """Values and field types by tag of a GDAL-written template, which is patched as little-endian."""
    byte_order, values, types = read_tags(tif)
    if byte_order != "<":
        raise ValueError("not a little-endian TIFF")
    return values, types


def netcdf_bytes(build) -> bytes:
    """Bytes of an in-memory NetCDF4 file filled by ``build(dataset)``."""
    import netCDF4

    ds = netCDF4.Dataset("inmemory.nc", mode="w", memory=1024, format="NETCDF4")
    try:
        build(ds)
    except BaseException:
        ds.close()
        raise
    return bytes(ds.close())


# ---------------------------------------------------------------- decoding (build)


@dataclass
class Decoded:
    """A chip file decoded to the modality's band order, before resampling."""

    array: np.ndarray  # (C, H, W) in the source dtype
    bounds: tuple[float, float, float, float] | None = None
    crs: str | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    nodata: float | int | None = None  # the file's own nodata tag (GeoTIFF GDAL_NODATA, NetCDF _FillValue)
    valid: np.ndarray | None = None  # (C, H, W) bool from the file's mask band; None when the file has none


def decode_chip_file(
    modality: Modality, data: bytes | str, where: str, chip: str, options: Mapping[str, Any] | None = None
) -> Decoded:
    """Decode one upstream file (its bytes, or a local path) into the modality's bands, checking band count."""
    options = options or {}
    try:
        if modality.file_ext == "tif":
            return _decode_tif(modality, data, where, chip, options)
        return _decode_nc(modality, data, where, chip, options)
    except ChipDataError:
        raise
    except Exception as e:  # rasterio / netCDF4 errors on truncated or corrupt files
        raise ChipDataError(where, chip, f"unreadable {modality.file_ext} file: {e}") from e


def _open_tif(data: bytes | str):
    import contextlib

    import rasterio
    from rasterio.io import MemoryFile

    stack = contextlib.ExitStack()
    # never list the chip's folder on open: upstream folders hold ~1e5 files
    stack.enter_context(rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"))
    if isinstance(data, str):
        return stack, stack.enter_context(rasterio.open(data))
    mem = stack.enter_context(MemoryFile(data))
    return stack, stack.enter_context(mem.open())


def _decode_tif(modality: Modality, data: bytes | str, where: str, chip: str, options: Mapping[str, Any]) -> Decoded:
    plain = open_plain(data)  # plain uncompressed EPSG:4326 strips: no GDAL at all (same values, see tiff_raw)
    if plain is not None:
        with plain:
            array, selection = _tif_bands(modality, list(plain.descriptions), plain.count, plain.read, where, chip,
                                          options)
            if array is not None and array.dtype == plain.dtype:
                return Decoded(array, plain.bounds, plain.crs, selection, _tag(plain.nodata, array.dtype))
    stack, src = _open_tif(data)
    with stack:
        picked: list[list[int] | None] = []

        def read(idx: list[int] | None) -> np.ndarray:
            picked.append(idx)
            return _read_tif_pixels(src, data, idx)

        array, selection = _tif_bands(modality, list(src.descriptions), src.count, read, where, chip, options)
        if array is None:
            raise ChipDataError(where, chip, "unreadable pixels")
        b = src.bounds
        return Decoded(array, (b.left, b.bottom, b.right, b.top), src.crs.to_string() if src.crs else None, selection,
                       _tag(src.nodata, array.dtype), _tif_mask(src, picked[0] if picked else None))


def _tag(value: float | None, dtype: np.dtype) -> float | int | None:
    """A nodata tag as a number of the array's kind (tags are stored as text and read as floats)."""
    if value is None:
        return None
    if dtype.kind in "iu" and float(value).is_integer():
        return int(value)
    return float(value)


def has_mask_band(src, bands: Iterable[int]) -> bool:
    """Whether any of these bands (0-based) of an open rasterio dataset has a mask band or alpha (a nodata tag is
    not one: it is handled as a value)."""
    from rasterio.enums import MaskFlags

    return any(MaskFlags.per_dataset in src.mask_flag_enums[i] or MaskFlags.alpha in src.mask_flag_enums[i]
               for i in bands)


def _tif_mask(src, idx: list[int] | None) -> np.ndarray | None:
    """Valid pixels from the file's mask band, or None when it has none (an all-valid mask is no mask)."""
    bands = list(range(src.count)) if idx is None else list(idx)
    if not has_mask_band(src, bands):
        return None
    return src.read_masks([i + 1 for i in bands]) != 0


def _tif_bands(modality: Modality, descriptions: list[str | None], count: int, read, where: str, chip: str,
               options: Mapping[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Check the band count and descriptions against the modality, then ``read(0-based indexes or None)``."""
    selection: dict[str, Any] = {}
    if modality.band_select_pattern:
        idx, selection = _select_bands_by_description(modality, descriptions, where, chip, options)
        return read(idx), selection
    if count != len(modality.bands):
        raise ChipDataError(where, chip, f"{count} bands, but modality {modality.name} has {len(modality.bands)}")
    if modality.file_band_names and all(descriptions):
        expected = [_norm(b) for b in modality.file_band_names]
        got = [_norm(d) for d in descriptions]  # type: ignore[arg-type]
        if got != expected:
            raise ChipDataError(where, chip, f"band descriptions {descriptions} differ from the expected "
                                             f"order {list(modality.file_band_names)}")
    return read(None), selection


def _read_tif_pixels(src, data: bytes | str, idx: list[int] | None) -> np.ndarray:
    """Bands ``idx`` (0-based; all when None) of an open rasterio dataset: straight from the strips for plain
    uncompressed files (see :mod:`shard_tools.tiff_raw`), through GDAL otherwise. Both give the same array."""
    want = (src.count if idx is None else len(idx), src.height, src.width)
    dtypes = set(src.dtypes) if idx is None else {src.dtypes[i] for i in idx}
    fast = read_pixels(data, idx) if len(dtypes) == 1 else None
    if fast is not None and fast.shape == want and fast.dtype == np.dtype(dtypes.pop()):
        return fast
    return src.read() if idx is None else src.read([i + 1 for i in idx])


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _select_bands_by_description(
    modality: Modality, descriptions: list[str | None], where: str, chip: str, options: Mapping[str, Any]
) -> tuple[list[int], dict[str, Any]]:
    found: dict[str, int] = {}
    for i, d in enumerate(descriptions):
        m = re.fullmatch(modality.band_select_pattern or "", d or "")
        if m:
            found[m.group("year")] = i
    if not found:
        raise ChipDataError(where, chip, f"no band description matches {modality.band_select_pattern!r} "
                                         f"(descriptions: {descriptions})")
    year = str(options.get("year") or "")
    if year not in found:
        if options.get("year"):
            raise ChipDataError(where, chip, f"no band for year {year}; available: {sorted(found)}")
        year = max(found)
    return [found[year]], {"band": descriptions[found[year]], "year": int(year)}


def _decode_nc(modality: Modality, data: bytes | str, where: str, chip: str, options: Mapping[str, Any]) -> Decoded:
    import netCDF4

    with (netCDF4.Dataset(data) if isinstance(data, str) else netCDF4.Dataset("chip.nc", memory=data)) as ds:
        grp = ds[modality.nc_group] if modality.nc_group else ds
        selection: dict[str, Any] = {}
        select: tuple[str, int] | None = None  # (dimension, the index chosen along it)
        if modality.nc_select_dim:
            index, selection = _select_nc_index(grp, modality.nc_select_dim, where, chip, options)
            select = (modality.nc_select_dim, index)
        layers = []
        fills: set[float | int] = set()
        coords: dict[tuple[str, int], list[str]] = {}
        for var in modality.nc_variables:
            if var.name not in grp.variables:
                raise ChipDataError(where, chip, f"variable {var.name!r} missing (has {sorted(grp.variables)})")
            v = grp.variables[var.name]
            v.set_auto_mask(False)
            dims = list(v.dimensions)
            arr = np.asarray(v[:])
            fill = getattr(v, "_FillValue", None)
            if select is not None:
                sdim, index = select
                if sdim not in dims:
                    raise ChipDataError(where, chip, f"variable {var.name!r} lacks dimension {sdim}")
                arr = np.take(arr, index, axis=dims.index(sdim))
                dims.remove(sdim)
            for dim, values in var.dims:
                if dim not in dims:
                    raise ChipDataError(where, chip, f"variable {var.name!r} lacks dimension {dim!r}")
                ckey = (dim, arr.shape[dims.index(dim)])
                if ckey not in coords:  # coordinate variables are shared by the layers: read each once
                    coords[ckey] = _coord_values(grp, dim, ckey[1])
                coord = coords[ckey]
                try:
                    pos = [coord.index(str(x)) for x in values]
                except ValueError:
                    raise ChipDataError(where, chip, f"{var.name}: dimension {dim} has {coord}, "
                                                     f"expected {list(values)}") from None
                arr = np.take(arr, pos, axis=dims.index(dim))
                # move the selected dim to the front of the remaining band dims, keeping registry order
                axis = dims.index(dim)
                arr = np.moveaxis(arr, axis, len([d for d in dims[:axis] if d in _band_dims(var)]))
            spatial = [d for d in dims if d not in _band_dims(var)]
            extra = [d for d in spatial[:-2] if arr.shape[dims.index(d)] == 1] if len(spatial) > 2 else []
            if len(spatial) - len(extra) != 2:
                raise ChipDataError(where, chip, f"variable {var.name!r} has dimensions {v.dimensions}; "
                                                 "expected two spatial dimensions")
            arr = arr.reshape((-1, *arr.shape[-2:]))
            if fill is not None and arr.dtype.kind == "f":
                arr = np.where(arr == fill, np.nan, arr)
            elif fill is not None:
                fills.add(int(np.asarray(fill).item()))
            layers.append(arr)
        shapes = {a.shape[1:] for a in layers}
        if len(shapes) != 1:
            raise ChipDataError(where, chip, f"variables have different grids {sorted(shapes)}")
        array = np.concatenate(layers, axis=0)
        if array.shape[0] != len(modality.bands):
            raise ChipDataError(where, chip, f"{array.shape[0]} layers, but modality {modality.name} has "
                                             f"{len(modality.bands)} bands")
        bounds = _nc_bounds(grp if "x" in grp.variables or "lon" in grp.variables else ds)
        if len(fills) > 1:
            raise ChipDataError(where, chip, f"variables have different fill values {sorted(fills)}")
        return Decoded(array, bounds, "EPSG:4326" if bounds else None, selection, fills.pop() if fills else None)


def _band_dims(var) -> set[str]:
    return {d for d, _ in var.dims}


def _coord_values(grp, dim: str, n: int) -> list[str]:
    if dim in grp.variables:
        vals = grp.variables[dim][:]
        return [str(v.decode() if isinstance(v, bytes) else v) for v in np.asarray(vals).tolist()]
    return [str(i) for i in range(n)]


def _nc_bounds(grp) -> tuple[float, float, float, float] | None:
    for xn, yn in (("x", "y"), ("lon", "lat"), ("longitude", "latitude")):
        if xn in grp.variables and yn in grp.variables:
            x = np.asarray(grp.variables[xn][:], dtype=float)
            y = np.asarray(grp.variables[yn][:], dtype=float)
            if x.size < 2 or y.size < 2:
                return None
            dx, dy = abs(x[1] - x[0]), abs(y[1] - y[0])
            return (x.min() - dx / 2, y.min() - dy / 2, x.max() + dx / 2, y.max() + dy / 2)
    return None


def _select_nc_index(grp, dim: str, where: str, chip: str, options: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """Choose one GUNW date pair along ``dim``. ``datepair`` values are 'END_START' (YYYYMMDD, end date first)."""
    values = _coord_values(grp, dim, len(grp.dimensions[dim]) if dim in grp.dimensions else 0)
    if not values:
        raise ChipDataError(where, chip, f"no {dim} values")
    rule = options.get("pair_rule", "longest")
    spans = []
    for v in values:
        m = re.fullmatch(r"(\d{8})_(\d{8})", v)
        if not m:
            raise ChipDataError(where, chip, f"{dim} value {v!r} is not YYYYMMDD_YYYYMMDD")
        end, start = (np.datetime64(f"{s[:4]}-{s[4:6]}-{s[6:]}") for s in m.groups())
        spans.append(int((end - start).astype(int)))
    if rule == "longest":
        i = max(range(len(values)), key=lambda k: (spans[k], values[k]))
    elif rule == "shortest":
        i = min(range(len(values)), key=lambda k: (spans[k], values[k]))
    elif rule.startswith("days="):
        target = int(rule.split("=", 1)[1])
        i = min(range(len(values)), key=lambda k: (abs(spans[k] - target), values[k]))
    else:
        raise ValueError(f"unknown GUNW pair rule {rule!r} (longest, shortest, days=N)")
    return i, {dim: values[i], "baseline_days": spans[i], "pair_rule": rule}


# ---------------------------------------------------------------- resampling


def resample(
    array: np.ndarray,
    shape: tuple[int, int],
    categorical: bool,
    nodata: float | int | None,
    method: str | None = None,
) -> np.ndarray:
    """Resize a (C,H,W) array covering a chip onto ``shape`` (same extent), keeping its dtype.

    ``bilinear`` (antialiased when shrinking) averages valid pixels only, weighting them as the kernel does; a
    target pixel is nodata when less than half of its kernel weight is valid, so nodata neither leaks into values
    nor spreads. ``nearest`` takes the source pixel under each target pixel centre and never invents a value
    (categorical layers, layers with special codes). Integer outputs are rounded back to the source dtype.
    """
    import torch
    import torch.nn.functional as F

    c, h, w = array.shape
    if (h, w) == tuple(shape):
        return array
    method = method or ("nearest" if categorical else "bilinear")
    if method == "nearest":
        idx_y = ((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64)
        idx_x = ((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64)
        return np.ascontiguousarray(array[:, idx_y][:, :, idx_x])
    if method != "bilinear":
        raise ValueError(f"unknown resampling {method!r} (bilinear or nearest)")
    values = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float64)
    valid = torch.ones_like(values, dtype=torch.bool)
    if array.dtype.kind == "f":
        valid &= ~torch.isnan(values)
    if nodata_value(nodata) is not None:
        valid &= values != nodata
    weights = valid.to(torch.float64)
    size = tuple(int(x) for x in shape)
    num = F.interpolate((values.nan_to_num(0.0) * weights)[None], size=size, mode="bilinear", antialias=True,
                        align_corners=False)[0]
    den = F.interpolate(weights[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    ok = den >= 0.5
    out = (num / den.clamp_min(1e-12)).numpy()
    if array.dtype.kind == "f":
        nd = nodata_value(nodata)
        fill = np.nan if nd is None else nd
        return np.where(ok.numpy(), out, fill).astype(array.dtype)
    info = np.iinfo(array.dtype)
    fill = nodata if nodata is not None else 0
    return np.where(ok.numpy(), np.clip(np.rint(out), info.min, info.max), fill).astype(array.dtype)
