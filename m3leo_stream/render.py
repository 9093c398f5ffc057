"""Chips as pictures: one modality's array as an RGB image, and a chip's members as one matplotlib figure.

What to draw comes from each modality's :class:`~m3leo_stream.modalities.Display`: true colour from its RGB band
triples (S2), SAR false colour (R = VV, G = VH, B = VV - VH, dB), class codes in their palette (ESA WorldCover),
any other band through a colormap. Pixels without data are drawn in :data:`NODATA_RGB`, special values (e.g. MODIS
water) in :data:`SPECIAL_RGB`. Arrays are ``(bands, H, W)`` numpy arrays in stored units (as in the shards) or in
physical units (stored × scale, e.g. transformed inputs mapped back); ``bands`` names their channels (default: all
the modality's bands, in storage order).

This module depends on the registry, numpy and matplotlib only (matplotlib's object API, no pyplot: figures are
not registered with a GUI and are freed with their last reference).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from m3leo_stream.modalities import Modality, Registry, polarisation_pairs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from m3leo_stream.shard_root import ShardRoot

log = logging.getLogger(__name__)

__all__ = ["NODATA_RGB", "SPECIAL_RGB", "Units", "chip_figure", "chip_png", "class_palette", "classes_rgb",
           "colormap_rgb", "picture", "stretch_range", "upsample"]

Units = Literal["stored", "physical"]

NODATA_RGB = (255, 0, 255)
"""Colour of pixels without data (magenta: no palette or colormap of the registry draws it)."""
SPECIAL_RGB = (96, 96, 96)
"""Colour of a modality's special values (``Modality.special_values``, e.g. MODIS tree cover's water)."""

PAD_PX = 6
"""Margin on each side of a figure panel, in pixels."""
TITLE_PX = 34
"""Height of a panel's title (two lines), in pixels."""
DPI = 100


# -- arrays to RGB ---------------------------------------------------------------------------------------------


def _physical(m: Modality, array: np.ndarray, bands: Sequence[str], units: Units) -> tuple[np.ndarray, np.ndarray]:
    """``array`` as float32 physical values with NaN where there is no data, and the special-value mask."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != len(bands):
        raise ValueError(f"{m.name}: expected an array of ({len(bands)}, H, W) for bands {list(bands)[:4]}..., "
                         f"got shape {array.shape}")
    idx = m.band_index(bands)
    scale = np.asarray([m.scale[i] for i in idx], np.float32)[:, None, None]
    a = np.asarray(array)
    special = np.zeros(a.shape, bool)
    if units == "stored":
        nodata = m.is_nodata(a)
        for code in m.special_values:
            special |= a == code
        phys = a.astype(np.float32) * scale
    elif units == "physical":
        phys = a.astype(np.float32)
        nodata = ~np.isfinite(phys)
        tol = 1e-3 * np.abs(scale)  # a stored value times its scale, up to float rounding

        def near(v: float) -> np.ndarray:
            return np.abs(phys - np.float32(v) * scale) <= tol

        if m.nodata is not None and not (isinstance(m.nodata, float) and math.isnan(m.nodata)):
            nodata |= near(float(m.nodata))
        for code in m.special_values:
            special |= near(code)
    else:
        raise ValueError(f"units must be 'stored' or 'physical', not {units!r}")
    special &= ~nodata
    return np.where(nodata | special, np.float32(np.nan), phys), special


def stretch_range(values: np.ndarray, fixed: tuple[float, float] | None = None) -> tuple[float, float]:
    """``fixed``, else the 2-98 % percentiles of the finite values (a constant picture gets a unit range)."""
    if fixed is not None:
        return float(fixed[0]), float(fixed[1])
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(ok, [2, 98]))
    if hi - lo < 1e-6 * max(1.0, abs(lo)):
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def _paint(img: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    img[mask] = rgb
    return img


def colormap_rgb(values: np.ndarray, colormap: str = "viridis",
                 value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) values → (H, W, 3) uint8 through a matplotlib colormap over ``value_range`` (None: the 2-98 %
    percentiles); NaN → :data:`NODATA_RGB`."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {colormap!r}") from None
    lo, hi = stretch_range(values, value_range)
    t = np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0, 1)
    img = (cmap(t)[..., :3] * 255 + 0.5).astype(np.uint8)
    return _paint(img, ~np.isfinite(values), NODATA_RGB)


def class_palette(m: Modality | int) -> np.ndarray:
    """(K, 3) uint8 colours of a modality's class codes: its declared palette, else (or for a class count) a fixed
    pseudo-random one."""
    if isinstance(m, Modality) and m.display.palette:
        return np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in m.display.palette], np.uint8)
    k = len(m.class_codes) if isinstance(m, Modality) else int(m)
    return np.random.default_rng(0).integers(40, 255, size=(k, 3), dtype=np.uint8)


def classes_rgb(index: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices (0..K-1, e.g. a segmentation's labels) → (H, W, 3) uint8; any other value (no data,
    an ignore index) → :data:`NODATA_RGB`."""
    a = np.asarray(index)
    ok = np.isfinite(a) & (a >= 0) & (a < len(palette)) if a.dtype.kind == "f" else (a >= 0) & (a < len(palette))
    img = np.empty(a.shape + (3,), np.uint8)
    img[...] = NODATA_RGB
    img[ok] = palette[a[ok].astype(np.int64)]
    return img


def _codes_to_index(m: Modality, codes: np.ndarray) -> np.ndarray:
    lut = np.full(max(m.class_codes) + 1, -1, np.int64)
    lut[list(m.class_codes)] = np.arange(len(m.class_codes))
    a = np.asarray(codes)
    ok = np.isfinite(a) & (a >= 0) & (a < len(lut)) if a.dtype.kind == "f" else (a >= 0) & (a < len(lut))
    out = np.full(a.shape, -1, np.int64)
    out[ok] = lut[a[ok].astype(np.int64)]
    return out


def _nan_mean(stack: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite entries; NaN where there is none."""
    ok = np.isfinite(stack)
    n = ok.sum(axis=0)
    total = np.where(ok, stack, 0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan).astype(np.float32)


def _nan_median(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 of the finite entries; NaN where there is none (a sort: several times np.nanmedian's
    speed on a chip's twelve months)."""
    n = np.isfinite(stack).sum(axis=0)
    ordered = np.sort(np.where(np.isfinite(stack), stack, np.inf), axis=0)  # the finite ones first
    lo = np.take_along_axis(ordered, (np.maximum(n - 1, 0) // 2)[None], axis=0)[0]
    hi = np.take_along_axis(ordered, np.minimum(n // 2, len(stack) - 1)[None], axis=0)[0]
    return np.where(n > 0, (lo + hi) / 2, np.nan).astype(np.float32)


def _true_colour(m: Modality, phys: np.ndarray, bands: Sequence[str]) -> np.ndarray | None:
    names = list(bands)
    triples = [[names.index(b) for b in t] for t in m.display.rgb_bands if all(b in names for b in t)]
    if not triples:
        return None
    stack = np.stack([phys[t] for t in triples])  # (T, 3, H, W)
    stack[~np.isfinite(stack).all(axis=1, keepdims=True).repeat(3, axis=1)] = np.nan  # a triple shows all or nothing
    rgb = _nan_median(stack).transpose(1, 2, 0)
    lo, hi = stretch_range(rgb, m.display.value_range)  # one range for the three: keeps the colour balance
    return _paint(_to_uint8(rgb, lo, hi), ~np.isfinite(rgb).all(-1), NODATA_RGB)


def _false_colour(m: Modality, phys: np.ndarray, bands: Sequence[str]) -> np.ndarray | None:
    pairs = polarisation_pairs(m, bands)
    if not pairs:
        return None
    vv = phys[[a for a, _ in pairs]]
    vh = phys[[b for _, b in pairs]]
    both = np.isfinite(vv) & np.isfinite(vh)
    vv, vh = np.where(both, vv, np.nan), np.where(both, vh, np.nan)
    vv_mean, vh_mean = _nan_mean(vv), _nan_mean(vh)
    channels = [vv_mean, vh_mean, vv_mean - vh_mean]
    img = np.stack([_to_uint8(c, *stretch_range(c, None)) for c in channels], -1)
    return _paint(img, ~np.isfinite(vv_mean), NODATA_RGB)


def _single_band(m: Modality, bands: Sequence[str]) -> int:
    names = list(bands)
    if m.display.band in names:
        return names.index(m.display.band)
    return 0


def picture(m: Modality, array: Any, bands: Sequence[str] | None = None, units: Units = "stored") -> np.ndarray:
    """One modality's ``(bands, H, W)`` array (numpy, or anything ``np.asarray`` takes) → (H, W, 3) uint8.

    Categorical: the class codes in the palette. With RGB band triples among ``bands``: true colour. SAR dB with
    VV/VH pairs: false colour. Otherwise the display band through the colormap."""
    names = list(m.bands if bands is None else bands)
    a = np.asarray(array)
    if m.is_categorical:
        if a.ndim == 3:
            a = a[0]
        valid = ~m.is_nodata(a) if units == "stored" else np.isfinite(a.astype(np.float64))
        return classes_rgb(np.where(valid, _codes_to_index(m, a), -1), class_palette(m))
    phys, special = _physical(m, a, names, units)
    img = _true_colour(m, phys, names)
    if img is None and m.kind == "sar_db":
        img = _false_colour(m, phys, names)
    if img is None:
        i = _single_band(m, names)
        img = _paint(colormap_rgb(phys[i], m.display.colormap, m.display.value_range), special[i], SPECIAL_RGB)
    return img


def upsample(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) → (size, size, 3) by nearest neighbour (coarse modalities drawn next to 10 m ones)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    rows = (np.arange(size) * img.shape[0]) // size
    cols = (np.arange(size) * img.shape[1]) // size
    return img[rows][:, cols]


# -- a chip as a figure ----------------------------------------------------------------------------------------


def _caption(m: Modality, bands: Sequence[str]) -> str:
    names = list(bands)
    if m.is_categorical:
        return f"{m.name}: {m.bands[0]}"
    if any(all(b in names for b in t) for t in m.display.rgb_bands):
        return f"{m.name}: true colour"
    if m.kind == "sar_db" and polarisation_pairs(m, names):
        return f"{m.name}: VV, VH, VV-VH"
    i = _single_band(m, names)
    unit = m.units[m.bands.index(names[i])]
    rng = m.display.value_range
    span = f"{rng[0]:g} to {rng[1]:g}" if rng else "2-98 % stretch"
    return f"{m.name}: {names[i]}" + (f" [{unit}]" if unit not in ("", "1") else "") + f"\n{span}, {m.display.colormap}"


def _hex(rgb: Sequence[int] | np.ndarray) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def _grid(n: int) -> tuple[int, int]:
    cols = n if n <= 4 else math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def chip_figure(chip: Mapping[str, Any], modalities: Registry | Mapping[str, Modality],
                names: Sequence[str] | None = None, bands: Mapping[str, Sequence[str]] | None = None,
                units: Units = "stored", size: int = 448, show_titles: bool = True,
                suptitle: str | None = None) -> Figure:
    """One panel per modality of ``chip`` (``{modality: (bands, H, W) array}``; other keys are ignored), each
    ``size`` × ``size`` pixels at :data:`DPI`, titled with what it shows, and a legend of the classes seen and of
    the no-data colour. ``names`` chooses and orders the modalities (default: those of ``chip`` in registry order);
    ``bands`` names the channels of arrays that do not hold all of a modality's bands."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    bands = dict(bands or {})
    shown = [n for n in (names if names is not None else modalities) if n in chip]
    if names is not None:
        missing = [n for n in names if n not in chip]
        if missing:
            log.info("not in this chip, not drawn: %s", ", ".join(missing))
    if not shown:
        raise ValueError(f"nothing to draw: the chip holds none of {list(names or modalities)}")
    rows, cols = _grid(len(shown))
    title = TITLE_PX if show_titles else 0
    top = 30 if suptitle else 0
    pictures: list[tuple[Modality, np.ndarray]] = []
    legend: dict[str, str] = {}  # label: #rrggbb
    for n in shown:
        m = modalities[n]
        arr = np.asarray(chip[n])
        img = picture(m, arr, bands.get(n), units)
        pictures.append((m, img))
        if m.is_categorical:
            idx = _codes_to_index(m, arr[0] if arr.ndim == 3 else arr)
            pal = class_palette(m)
            for k in np.unique(idx[idx >= 0]):
                label = m.class_names[k] if m.class_names else str(m.class_codes[k])
                legend.setdefault(label, _hex(pal[k]))
        if (img == NODATA_RGB).all(-1).any():
            legend.setdefault("no data", _hex(NODATA_RGB))
        if (img == SPECIAL_RGB).all(-1).any() and m.special_values:
            legend.setdefault(" / ".join(m.special_values.values()), _hex(SPECIAL_RGB))
    width = cols * (size + 2 * PAD_PX)
    per_row = max(1, width // 170)
    legend_px = (math.ceil(len(legend) / per_row) * 18 + 8) if legend else 0
    height = top + rows * (title + size + 2 * PAD_PX) + legend_px
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for i, ((m, img), n) in enumerate(zip(pictures, shown)):
        r, c = divmod(i, cols)
        x = c * (size + 2 * PAD_PX) + PAD_PX
        y = height - top - (r + 1) * (title + size + 2 * PAD_PX) + PAD_PX  # matplotlib counts from the bottom
        ax = fig.add_axes((x / width, y / height, size / width, size / height))
        ax.imshow(upsample(img, size), interpolation="nearest")
        ax.set_axis_off()
        if show_titles:
            ax.set_title(_caption(m, bands.get(n, m.bands)), fontsize=9, pad=3)
    if suptitle:
        fig.suptitle(suptitle, y=1 - 6 / height, va="top", fontsize=11)
    if legend:
        fig.legend([Patch(facecolor=c, edgecolor="0.3") for c in legend.values()], list(legend), loc="lower center",
                   ncol=per_row, fontsize=8, frameon=False, borderaxespad=0.2, handlelength=1.2)
    return fig


def chip_png(root: ShardRoot, key: str, out: str | Path, names: Sequence[str] | None = None,
             size: int = 448) -> Path:
    """Draw the chip ``key`` of ``root`` (a :class:`~m3leo_stream.shard_root.ShardRoot`) into the PNG ``out``:
    every member, or the modalities ``names``; returns its path."""
    sample = root.read_sample(key, names)
    mods = root.modalities
    where = f"{key} ({sample['region']}, {sample['split']}, {sample['lon']:.3f}, {sample['lat']:.3f})"
    fig = chip_figure(sample, mods, names, size=size, suptitle=where)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    log.debug("wrote %s (%s)", path, ", ".join(n for n in (names or mods) if n in sample))
    return path
