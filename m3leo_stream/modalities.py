"""The modality registry: the one place where band names, dtypes, kinds and canonical shapes live.

Everything else (the shard builder, the loader, the device transforms, the models, the dataset card) asks this
module. Facts that ``reference/m3leo.md`` marks UNVERIFIED are listed in each entry's ``unverified`` field and can be
overridden with a user YAML file (see :func:`load_user_modalities`) instead of being silently assumed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

CHIP_SIZE_M = 4480.0
"""Side of an M3LEO chip in metres (448 px at 10 m)."""

SEASONS = ("winter", "spring", "summer", "fall")
MONTHS = tuple(f"{m:02d}" for m in range(1, 13))

BANDS_KEY = "bands"
"""Batch key: ``{modality: [band names]}``, the stored bands each modality tensor of a raw batch carries."""

RESERVED_NAMES = ("json", "key", "region", "split", "shard", "lon", "lat", "valid", BANDS_KEY)
"""Names a modality may not take: they are index columns, tar member suffixes or batch keys."""

KINDS = ("sar_db", "optical", "coherence", "phase", "categorical", "continuous")
"""Per-band kinds; device transforms pick their treatment from these."""


@dataclass(frozen=True)
class NcVariable:
    """One NetCDF variable and the ordered coordinate values selected from each of its leading dimensions."""

    name: str
    dims: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    band_name: str | None = None  # name of the single band when the variable has no selected dimension

    def band_names(self) -> list[str]:
        names = [self.band_name or self.name]
        for _, values in self.dims:
            names = [f"{n}_{v}" for n in names for v in values]
        return names


@dataclass(frozen=True)
class SourceEncoding:
    """One way the release's exporters wrote a modality's files, and how it maps onto what is stored.

    ``stored = view(source) × gain + offset`` (rounded for integer stored dtypes; the range is checked). Source
    pixels that hold ``nodata`` (and NaN, and whatever the file's own nodata tag and mask mark) become the modality's
    stored nodata. ``evidence`` cites the exporter code the encoding is read from.
    """

    name: str
    dtype: str
    view: str | None = None  # reinterpret the bits as this dtype first (undoes a two's-complement wrap)
    gain: float = 1.0
    offset: float = 0.0
    nodata: float | int | None = None  # the source value that means no data (besides the file's tag and mask)
    description: str = ""
    evidence: str = ""

    def __post_init__(self) -> None:
        np.dtype(self.dtype)
        if self.view is not None and np.dtype(self.view).itemsize != np.dtype(self.dtype).itemsize:
            raise ValueError(f"encoding {self.name!r}: view {self.view} has another item size than {self.dtype}")

    @property
    def is_identity(self) -> bool:
        return self.view is None and self.gain == 1.0 and self.offset == 0.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["nodata"] = _json_number(self.nodata)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SourceEncoding:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if kw.get("nodata") == "nan":
            kw["nodata"] = float("nan")
        return cls(**kw)


@dataclass(frozen=True)
class Display:
    """How a modality is drawn as a picture (:mod:`m3leo_stream.render`).

    ``rgb_bands``: (red, green, blue) band triples for true colour; the picture is the per-pixel median of the
    triples with data (S2: one triple per month, so cloud-masked months fill each other's gaps). ``palette``:
    one ``#rrggbb`` colour per class code (categorical modalities). ``band``: the band a single-band picture shows
    (default: the first), drawn through the matplotlib colormap ``colormap`` over ``value_range`` (physical units;
    None: the chip's 2-98 % percentiles).
    """

    rgb_bands: tuple[tuple[str, str, str], ...] = ()
    palette: tuple[str, ...] = ()
    band: str | None = None
    colormap: str = "viridis"
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for c in self.palette:
            if not re.fullmatch(r"#[0-9a-fA-F]{6}", c):
                raise ValueError(f"display palette colour {c!r} is not #rrggbb")
        if any(len(t) != 3 for t in self.rgb_bands):
            raise ValueError(f"display rgb_bands {self.rgb_bands!r}: each entry is a (red, green, blue) triple")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"display value_range {self.value_range!r}: low must be below high")

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Display:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if "rgb_bands" in kw:
            kw["rgb_bands"] = tuple(tuple(t) for t in kw["rgb_bands"] or ())
        if "palette" in kw:
            kw["palette"] = tuple(kw["palette"] or ())
        if kw.get("value_range") is not None:
            kw["value_range"] = tuple(float(v) for v in kw["value_range"])
        return cls(**kw)


@dataclass(frozen=True, repr=False)
class Modality:
    """A modality of the registry.

    ``bands`` are in storage order; every stored array has shape ``(len(bands), canonical_px, canonical_px)`` and
    dtype ``dtype``. Physical value = stored value × ``scale[band]``.
    """

    name: str
    folder_pattern: str
    file_ext: str
    bands: tuple[str, ...]
    dtype: str
    kind: str
    resolution_m: float
    description: str
    source: str
    band_kinds: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    scale: tuple[float, ...] = ()
    nodata: float | int | None = None
    class_codes: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    special_values: Mapping[int, str] = field(default_factory=dict)
    # (VV band, VH band) of one acquisition; None: bands named *_vv* paired with the same name with _vh
    polarisation_pairs: tuple[tuple[str, str], ...] | None = None
    file_band_names: tuple[str, ...] = ()  # band descriptions expected in upstream GeoTIFFs, when known
    band_select_pattern: str | None = None  # regex on GeoTIFF band descriptions; one band per matching year
    nc_group: str | None = None
    nc_variables: tuple[NcVariable, ...] = ()
    nc_select_dim: str | None = None  # a dimension chosen at build time (GUNW date pairs)
    encodings: tuple[SourceEncoding, ...] = ()  # accepted source encodings besides the stored dtype as is
    unverified: tuple[str, ...] = ()
    user_declared: bool = False
    display: Display = field(default_factory=Display)

    def __post_init__(self) -> None:
        n = len(self.bands)
        if n == 0:
            raise ValueError(f"modality {self.name!r}: no bands")
        if len(set(self.bands)) != n:
            raise ValueError(f"modality {self.name!r}: duplicate band names")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name) or self.name in RESERVED_NAMES:
            raise ValueError(f"modality name {self.name!r}: use lowercase letters, digits and _ (no dots), "
                             f"not one of {RESERVED_NAMES}")
        np.dtype(self.dtype)  # raises on an unknown dtype
        if self.file_ext not in ("tif", "nc"):
            raise ValueError(f"modality {self.name!r}: file_ext must be 'tif' or 'nc'")
        fill = {
            "band_kinds": (self.kind,) * n,
            "units": ("",) * n,
            "scale": (1.0,) * n,
        }
        for attr, default in fill.items():
            value = getattr(self, attr)
            if not value:
                object.__setattr__(self, attr, default)
            elif len(value) != n:
                raise ValueError(f"modality {self.name!r}: {attr} has {len(value)} entries for {n} bands")
        for k in (self.kind, *self.band_kinds):
            if k not in KINDS:
                raise ValueError(f"modality {self.name!r}: unknown kind {k!r} (known: {', '.join(KINDS)})")
        if self.kind == "categorical" and not self.class_codes:
            raise ValueError(f"modality {self.name!r}: categorical modalities need class_codes")
        if self.class_names and len(self.class_names) != len(self.class_codes):
            raise ValueError(f"modality {self.name!r}: class_names and class_codes differ in length")
        shown = [b for t in self.display.rgb_bands for b in t] + ([self.display.band] if self.display.band else [])
        unknown = sorted(set(shown) - set(self.bands))
        if unknown:
            raise ValueError(f"modality {self.name!r}: display names unknown bands {unknown}")
        if self.display.palette and len(self.display.palette) != len(self.class_codes):
            raise ValueError(f"modality {self.name!r}: display palette has {len(self.display.palette)} colours for "
                             f"{len(self.class_codes)} class codes")
        object.__setattr__(self, "polarisation_pairs", _checked_pairs(self))

    def __repr__(self) -> str:
        return f"Modality({self.name!r}: {len(self.bands)} bands {self.dtype} {self.canonical_px} px, {self.kind})"

    @property
    def canonical_px(self) -> int:
        """round(4480 m / native resolution): the side of every stored array."""
        return int(round(CHIP_SIZE_M / self.resolution_m))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.bands), self.canonical_px, self.canonical_px)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of one uncompressed array of this modality."""
        c, h, w = self.shape
        return c * h * w * self.np_dtype.itemsize

    @property
    def is_categorical(self) -> bool:
        return self.kind == "categorical"

    def band_index(self, names: Iterable[str]) -> list[int]:
        """Indices of ``names`` in storage order, with a clear error naming what is unknown."""
        idx = []
        for b in names:
            if b not in self.bands:
                raise KeyError(f"modality {self.name!r} has no band {b!r}; bands: {', '.join(self.bands)}")
            idx.append(self.bands.index(b))
        return idx

    def match_folder(self, folder: str) -> re.Match[str] | None:
        return re.fullmatch(self.folder_pattern, folder)

    def encoding_for(self, dtype: Any) -> SourceEncoding | None:
        """How a source file of ``dtype`` maps onto what is stored: a declared encoding of that dtype, else the
        stored dtype as is (or a lossless cast to it) with the stored nodata; None when nothing maps it."""
        dt = np.dtype(dtype)
        for enc in self.encodings:
            if np.dtype(enc.dtype) == dt:
                return enc
        if dt == self.np_dtype:
            return SourceEncoding("as stored", self.dtype, nodata=self.nodata)
        if np.can_cast(dt, self.np_dtype, "safe"):
            return SourceEncoding(f"lossless cast {dt.name} to {self.dtype}", dt.name, nodata=self.nodata)
        return None

    def accepted_dtypes(self) -> list[str]:
        """Source dtypes a build maps exactly (declared encodings first, then the stored dtype)."""
        return list(dict.fromkeys([e.dtype for e in self.encodings] + [self.dtype]))

    def is_nodata(self, array: np.ndarray) -> np.ndarray:
        """Boolean mask of nodata pixels (the nodata value, and NaN for float arrays)."""
        return nodata_mask(array, self.nodata)

    def to_json(self) -> dict[str, Any]:
        """The entry as written into ``manifest.json``."""
        d = dataclasses.asdict(self)
        d["nc_variables"] = [
            {"name": v.name, "dims": [[k, list(vals)] for k, vals in v.dims], "band_name": v.band_name}
            for v in self.nc_variables
        ]
        d["special_values"] = {str(k): v for k, v in self.special_values.items()}
        d["encodings"] = [e.to_json() for e in self.encodings]
        d["nodata"] = _json_number(self.nodata)
        d["shape"] = list(self.shape)
        d["canonical_px"] = self.canonical_px
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Modality:
        """Inverse of :meth:`to_json` (also used for user YAML declarations)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        for k in ("bands", "band_kinds", "units", "file_band_names", "class_names", "unverified"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        if "scale" in kw:
            kw["scale"] = tuple(float(s) for s in kw["scale"])
        if "class_codes" in kw:
            kw["class_codes"] = tuple(int(c) for c in kw["class_codes"])
        if "special_values" in kw:
            kw["special_values"] = {int(k): v for k, v in (kw["special_values"] or {}).items()}
        if kw.get("polarisation_pairs") is not None:
            kw["polarisation_pairs"] = tuple(tuple(p) for p in kw["polarisation_pairs"])
        if "nc_variables" in kw:
            kw["nc_variables"] = tuple(
                NcVariable(v["name"], tuple((k, tuple(vals)) for k, vals in v.get("dims", ())), v.get("band_name"))
                for v in kw["nc_variables"] or ()
            )
        if "encodings" in kw:
            kw["encodings"] = tuple(SourceEncoding.from_json(e) for e in kw["encodings"] or ())
        if kw.get("nodata") == "nan":
            kw["nodata"] = float("nan")
        if isinstance(kw.get("display"), Mapping):
            kw["display"] = Display.from_json(kw["display"])
        kw["resolution_m"] = float(kw["resolution_m"])
        m = cls(**kw)
        if "display" not in kw:  # an entry that states no display facts is drawn as the built-in of its name
            builtin = next((b for b in BUILTIN if b.name == m.name), None)
            if builtin is not None and builtin.display != m.display:
                try:
                    return dataclasses.replace(m, display=builtin.display)
                except ValueError:  # the built-in's facts do not fit this entry's bands or classes
                    pass
        return m


def _checked_pairs(m: Modality) -> tuple[tuple[str, str], ...]:
    """``m.polarisation_pairs`` checked against its bands, or (None) found by the ``_vv`` / ``_vh`` naming."""
    if m.polarisation_pairs is None:
        return tuple((b, b.replace("_vv", "_vh")) for b in m.bands if "_vv" in b and b.replace("_vv", "_vh") in m.bands)
    pairs = tuple((str(a), str(b)) for a, b in m.polarisation_pairs)
    used = [b for p in pairs for b in p]
    unknown = [b for b in used if b not in m.bands]
    if unknown or len(set(used)) != len(used):
        raise ValueError(f"modality {m.name!r}: polarisation_pairs must pair distinct bands of the modality; "
                         f"got {[list(p) for p in pairs]}" + (f" (unknown: {unknown})" if unknown else ""))
    return pairs


def polarisation_pairs(m: Modality, names: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """Positions in ``names`` (default: ``m.bands``; e.g. the channel names of a transformed tensor) of the
    (VV, VH) band pairs of ``m`` whose both bands ``names`` holds, in the order of the VV band in ``names``."""
    pos = {n: i for i, n in enumerate(m.bands if names is None else names)}
    return sorted((pos[a], pos[b]) for a, b in m.polarisation_pairs or () if a in pos and b in pos)


_N = TypeVar("_N")


def is_nan(x: object) -> bool:
    """Whether ``x`` is a float NaN, such as a NaN nodata value: ``isnan`` finds those pixels, ``==`` never does."""
    return isinstance(x, float) and math.isnan(x)


def nodata_value(nodata: _N | None) -> _N | None:
    """``nodata`` where it is a value that ``==`` finds; None where there is none or it is NaN."""
    return None if nodata is None or is_nan(nodata) else nodata


def nodata_mask(array: np.ndarray, nodata: float | int | np.generic | np.ndarray | None) -> np.ndarray:
    """Boolean mask of the nodata pixels of ``array``: NaN in a float array, and the pixels equal to ``nodata``."""
    mask = np.isnan(array) if array.dtype.kind == "f" else np.zeros(array.shape, dtype=bool)
    if nodata_value(nodata) is not None:
        mask |= array == nodata
    return mask


def _json_number(x: float | int | None) -> float | int | str | None:
    if is_nan(x):
        return "nan"
    return x


def _s1grd_bands() -> tuple[tuple[str, ...], tuple[str, ...]]:
    ours, upstream = [], []
    for s in SEASONS:
        for pol in ("vv", "vh"):
            for d in ("asc", "des"):
                ours.append(f"{s}_{pol}_{d}")
                upstream.append(f"{s}_{pol}{d}")
    return tuple(ours), tuple(upstream)


_S1_BANDS, _S1_FILE_BANDS = _s1grd_bands()
_S1_PAIRS = tuple((f"{s}_vv_{d}", f"{s}_vh_{d}") for s in SEASONS for d in ("asc", "des"))
_S2_BANDS = tuple(f"{m}_{c}" for m in MONTHS for c in ("red", "green", "blue"))

_GSSIC_VARS = (
    NcVariable("amplitude", (("season", SEASONS), ("polarimetry", ("vv", "vh")))),
    NcVariable("coherence", (("season", SEASONS), ("deltadays", (12, 24, 36, 48)))),
    NcVariable("decaymodel", (("season", SEASONS), ("param", ("rho", "tau", "rmse")))),
    NcVariable("geometry", (("feature", ("inc", "lsmap")),)),
)
_GSSIC_BANDS = tuple(b for v in _GSSIC_VARS for b in v.band_names())
_GSSIC_PAIRS = tuple((f"amplitude_{s}_vv", f"amplitude_{s}_vh") for s in SEASONS)


def _gssic_band_kinds() -> tuple[str, ...]:
    kinds = []
    for b in _GSSIC_BANDS:
        kinds.append("coherence" if b.startswith("coherence") else
                     "categorical" if b == "geometry_lsmap" else "continuous")
    return tuple(kinds)


def _gssic_units() -> tuple[str, ...]:
    units = []
    for b in _GSSIC_BANDS:
        if b.startswith("coherence"):
            units.append("1")
        elif b.startswith("geometry_inc"):
            units.append("deg")
        elif b == "geometry_lsmap":
            units.append("flag code")
        else:
            units.append("DN")
    return tuple(units)


# Evidence for the encodings below: the code that made the release.
_GEETILES_2023 = ("rramosp/geetiles@7beae01 geetiles/gee.py GEETile.get_tile: rasterio.mask.mask then "
                  "out_image.astype(dataset_definition.get_dtype())")
_S1_UINT16 = SourceEncoding(
    "geetiles-2023-uint16", "uint16", view="int16", gain=100.0, nodata=0,
    description="float dB seasonal means cast to uint16: negative dB wrap (-15.7 -> 65521; read as int16 -> -15, "
    "truncated toward zero), NaN and masked pixels -> 0, a season/orbit without acquisitions -> an all-zero band. "
    "0 is nodata, so genuine values in (-1, 1) dB are lost with it.",
    evidence=f"{_GEETILES_2023}; defs/s1grd.py get_dtype() 'uint16'; spaceml-org/M3LEO src/fdlsar/io/io.py "
    "load_s1grd astype(np.int16)",
)
_S1_INT16 = SourceEncoding(
    "int16 dB", "int16", gain=100.0, nodata=0,
    description="whole dB as int16 (the uint16 files read as upstream's loader does); 0 is nodata as there.",
    evidence="spaceml-org/M3LEO src/fdlsar/io/io.py load_s1grd astype(np.int16)",
)
_S1_UINT8 = SourceEncoding(
    "geetiles-2024-uint8", "uint8", gain=100.0 * 30.0 / 255.0, offset=-3000.0,
    description="dB rescaled from [-30, 0] to uint8 (DN = 255 (dB + 30) / 30, truncated; dB = DN * 30/255 - 30), "
    "nodata in the GDAL mask. Values outside [-30, 0] dB wrapped in the exporter and cannot be recovered.",
    evidence="rramosp/geetiles@f9df96a ('fixed s1grd typing') defs/s1grd.py post_process_tilefile",
)
_S1_FLOAT32 = SourceEncoding(
    "float32 dB", "float32", gain=100.0, nodata=float("nan"),
    description="float dB (the exporter's values before its cast); NaN is nodata. Stored to 0.01 dB.",
    evidence="rramosp/geetiles@f9df96a defs/s1grd.py get_dtype() 'float32' before post_process_tilefile",
)


_GUNW_VARS = (NcVariable("amplitude"), NcVariable("coherence"), NcVariable("unwrappedPhase"))
_WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
_WORLDCOVER_NAMES = (
    "tree cover", "shrubland", "grassland", "cropland", "built-up", "bare / sparse vegetation",
    "snow and ice", "permanent water bodies", "herbaceous wetland", "mangroves", "moss and lichen",
)
_WORLDCOVER_PALETTE = (  # the ESA WorldCover product legend
    "#006400", "#ffbb22", "#ffff4c", "#f096ff", "#fa0000", "#b4b4b4", "#f0f0f0", "#0064c8", "#0096a0", "#00cf75",
    "#fae6a0",
)

BUILTIN: tuple[Modality, ...] = (
    Modality(
        name="s1grd",
        folder_pattern=r"s1grd-(?P<year>\d{4})",
        file_ext="tif",
        bands=_S1_BANDS,
        file_band_names=_S1_FILE_BANDS,
        polarisation_pairs=_S1_PAIRS,
        dtype="int16",
        kind="sar_db",
        units=("dB",) * 16,
        scale=(0.01,) * 16,
        nodata=-32768,
        resolution_m=10.0,
        encodings=(_S1_UINT16, _S1_INT16, _S1_UINT8, _S1_FLOAT32),
        display=Display(colormap="gray"),
        description="Sentinel-1 GRD seasonal backscatter (sigma0, dB; 2023 exports: means truncated to whole dB), "
        "ascending and descending orbits; stored in 0.01 dB.",
        source="Google Earth Engine COPERNICUS/S1_GRD, seasonal means (M3LEO s1grd-YYYY, rramosp/geetiles)",
    ),
    Modality(
        name="s2rgbm",
        folder_pattern=r"s2rgbm-(?P<year>\d{4})",
        file_ext="tif",
        bands=_S2_BANDS,
        file_band_names=_S2_BANDS,
        dtype="uint8",
        kind="optical",
        display=Display(rgb_bands=tuple((f"{m}_red", f"{m}_green", f"{m}_blue") for m in MONTHS)),
        units=("reflectance",) * 36,
        scale=(0.3 / 255,) * 36,
        nodata=0,
        resolution_m=10.0,
        encodings=(SourceEncoding(
            "geetiles-2023-uint8", "uint8", nodata=0,
            description="cloud-masked monthly medians through .visualize(min=0, max=0.3): DN = 255 clip(rho / 0.3); "
            "masked pixels and months without a clear scene are 0.",
            evidence="rramosp/geetiles@7beae01 defs/s2rgbm.py get_gee_image (maskS2clouds, median, visualize)",
        ),),
        description="Sentinel-2 L2A harmonized monthly cloud-masked median RGB, month-major (01_red, 01_green, ...); "
        "surface reflectance = DN x 0.3/255 (saturates at 0.3); 0 = no clear scene.",
        source="Google Earth Engine COPERNICUS/S2_SR_HARMONIZED, monthly medians (M3LEO s2rgbm-YYYY)",
    ),
    Modality(
        name="gssic",
        folder_pattern=r"gssic",
        file_ext="nc",
        bands=_GSSIC_BANDS,
        band_kinds=_gssic_band_kinds(),
        polarisation_pairs=_GSSIC_PAIRS,
        units=_gssic_units(),
        dtype="float32",
        kind="coherence",
        nodata=float("nan"),
        resolution_m=90.0,
        nc_variables=_GSSIC_VARS,
        display=Display(band="coherence_summer_12", colormap="magma", value_range=(0.0, 1.0)),
        scale=tuple(0.01 if b.startswith("coherence") else 1.0 for b in _GSSIC_BANDS),
        encodings=(SourceEncoding(
            "sartiles-gssic", "float32", nodata=float("nan"),
            description="the GSSIC tiles' values as float with NaN for no data: coherence DN = gamma x 100 (0-100), "
            "amplitude and decay-model DN, incidence angle, layover/shadow flag codes; file season order summer, "
            "fall, winter, spring (selected by name).",
            evidence="rramosp/sartiles sartiles/gssic.py GSSICTile.get_chip (band_data of the tiles, xr.Dataset "
            "amplitude/coherence/decaymodel/geometry, to_netcdf); season_names",
        ),),
        description="Global Seasonal Sentinel-1 Interferometric Coherence and Backscatter: seasonal amplitude (DN), "
        "coherence at 12/24/36/48-day baselines (gamma = DN / 100), coherence decay model (rho, tau, rmse; DN), "
        "incidence angle and layover/shadow flags (categorical, resampled nearest).",
        source="ASF GSSIC (Kellndorfer et al.), Dec 2019 - Nov 2020 seasons, chipped by rramosp/sartiles",
        unverified=("amplitude DN to backscatter conversion (stored as DN)",
                    "decay-model parameter scaling (stored as DN)", "lsmap code meanings"),
    ),
    Modality(
        name="gunw",
        folder_pattern=r"gunw(?:48)?[-_](?:\d{4}-\d{2}-\d{2}_\d{4}-\d{2}-\d{2}|\d{4}-\d{2}|\d{8}_\d{8})",
        file_ext="nc",
        bands=("amplitude", "coherence", "unwrappedPhase"),
        band_kinds=("continuous", "coherence", "phase"),
        units=("", "1", "rad"),
        dtype="float32",
        kind="phase",
        nodata=float("nan"),
        resolution_m=90.0,
        nc_group="/science/grids/data",
        nc_variables=_GUNW_VARS,
        nc_select_dim="datepair",
        display=Display(band="coherence", colormap="magma", value_range=(0.0, 1.0)),
        description="ARIA Sentinel-1 geocoded unwrapped interferogram: amplitude, coherence and unwrapped phase of "
        "one date pair per chip, chosen at build time (the choice is recorded in each sample's json).",
        source="ASF ARIA S1 GUNW chipped by rramosp/sartiles, one window per folder (gunw_<start>_<end>, "
        "gunw-<start>_<end>, gunw-YYYY-MM, gunw48-YYYY-MM)",
        unverified=("whether connectedComponents is present in M3LEO files (not stored)",),
    ),
    Modality(
        name="esawc",
        folder_pattern=r"esaworldcover-(?P<year>\d{4})",
        file_ext="tif",
        bands=("landcover",),
        dtype="uint8",
        kind="categorical",
        units=("class code",),
        nodata=0,
        class_codes=_WORLDCOVER_CODES,
        class_names=_WORLDCOVER_NAMES,
        display=Display(palette=_WORLDCOVER_PALETTE),
        resolution_m=10.0,
        description="ESA WorldCover land cover, 11 classes coded 10..100; 0 = nodata.",
        source="ESA WorldCover v100 (2020) / v200 (2021)",
    ),
    Modality(
        name="biomass",
        folder_pattern=r"biomass-(?P<year>\d{4})",
        file_ext="nc",
        bands=("agb", "agb_se"),
        units=("Mg/ha", "Mg/ha"),
        dtype="float32",
        kind="continuous",
        nodata=float("nan"),
        resolution_m=100.0,
        nc_variables=(NcVariable("agb"), NcVariable("agb_se")),
        display=Display(colormap="YlGn", value_range=(0.0, 400.0)),
        encodings=(SourceEncoding("float64", "float64", nodata=float("nan"),
                                  description="float64 Mg/ha, NaN no data; stored as float32 (24-bit mantissa)"),),
        description="Above-ground biomass and its standard error.",
        source="ESA CCI Biomass",
        unverified=("units (CCI convention Mg/ha assumed)", "source dtype (float32 and float64 accepted)"),
    ),
    Modality(
        name="ghsbuilts",
        folder_pattern=r"(?:ghsbuilts|ghs-built-S)-(?P<year>\d{4})",
        file_ext="tif",
        bands=("built_surface",),
        units=("m2",),
        display=Display(colormap="inferno", value_range=(0.0, 10000.0)),
        dtype="float32",
        kind="continuous",
        nodata=float("nan"),
        resolution_m=100.0,
        encodings=(
            SourceEncoding("uint16 with 65535 fill", "uint16", nodata=65535,
                           description="m2 per cell as uint16, 65535 no data"),
            SourceEncoding("float64", "float64", nodata=float("nan"),
                           description="float64, NaN no data; stored as float32"),
        ),
        description="Built-up surface per 100 m cell.",
        source="JRC GHSL GHS-BUILT-S",
        unverified=("semantics (m2 of built-up surface per cell, GHS-BUILT-S convention)",
                    "source dtype (float32, float64 and uint16 with 65535 fill accepted)"),
    ),
    Modality(
        name="modisveg",
        folder_pattern=r"modis44b006veg",
        file_ext="tif",
        bands=("percent_tree_cover",),
        units=("%",),
        dtype="uint8",
        kind="continuous",
        nodata=253,
        special_values={200: "water"},
        display=Display(colormap="Greens", value_range=(0.0, 100.0)),
        band_select_pattern=r"Percent_Tree_Cover_(?P<year>\d{4})",
        resolution_m=250.0,
        description="MODIS MOD44B.006 percent tree cover of one year (chosen at build time); 200 = water.",
        source="NASA MODIS MOD44B.006 Vegetation Continuous Fields",
        unverified=("fill value (253 assumed, MOD44B convention)",),
    ),
    Modality(
        name="srtmdem",
        folder_pattern=r"s(?:rt|tr)mdem",
        file_ext="tif",
        bands=("elevation", "slope"),
        file_band_names=("elevation", "slope"),
        units=("m", "deg"),
        display=Display(colormap="cividis"),  # not "terrain": its low end reads as sea
        dtype="int16",
        kind="continuous",
        nodata=-32768,
        resolution_m=10.0,
        encodings=(
            SourceEncoding(
                "geetiles-2023-uint16", "uint16", view="int16",
                description="SRTM90 elevation (m) and ee.Terrain.slope (deg) exported on the 10 m chip grid and "
                "cast to uint16: elevations below sea level wrap (read as int16), slope truncated to whole degrees; "
                "0 is sea level, not nodata.",
                evidence=f"{_GEETILES_2023}; defs/strmdem.py (CGIAR/SRTM90_V4 + ee.Terrain.slope, 'uint16')",
            ),
        ),
        description="SRTM elevation (m) and slope (deg) on the 10 m chip grid (SRTM90 resampled by Earth Engine).",
        source="CGIAR SRTM90 V4 via Google Earth Engine (folders srtmdem and strmdem)",
    ),
)


class Registry(Mapping[str, Modality]):
    """An ordered, read-only name → :class:`Modality` map."""

    def __init__(self, modalities: Iterable[Modality]):
        self._m: dict[str, Modality] = {}
        for m in modalities:
            self._m[m.name] = m

    def __getitem__(self, name: str) -> Modality:
        try:
            return self._m[name]
        except KeyError:
            raise KeyError(f"unknown modality {name!r}; known: {', '.join(self._m)}") from None

    def __iter__(self):
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def __repr__(self) -> str:
        return f"Registry({', '.join(self._m)})"

    def select(self, names: Sequence[str] | None) -> list[Modality]:
        """Modalities by name, in registry order, with a clear error for unknown names."""
        if names is None:
            return list(self._m.values())
        for n in names:
            self[n]
        return [m for m in self._m.values() if m.name in set(names)]

    def extended(self, extra: Iterable[Modality]) -> Registry:
        """A registry with ``extra`` added; an entry with a built-in name replaces it (user overrides)."""
        merged = dict(self._m)
        for m in extra:
            merged[m.name] = m
        return Registry(merged.values())

    def for_folder(self, folder: str) -> Modality | None:
        for m in self._m.values():
            if m.match_folder(folder):
                return m
        return None

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {n: m.to_json() for n, m in self._m.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Mapping[str, Any]]) -> Registry:
        return cls(Modality.from_json(v) for v in d.values())


REGISTRY = Registry(BUILTIN)


def load_user_modalities(path: str | Path, base: Registry = REGISTRY) -> Registry:
    """Extend ``base`` with modalities declared in a YAML file.

    The file holds ``modalities:`` a list of entries with the :class:`Modality` fields (``name``, ``bands``,
    ``dtype``, ``kind``, ``resolution_m``, ``nodata`` ...). ``folder_pattern`` defaults to the name and
    ``file_ext`` to ``tif``. An entry whose name is built in replaces that entry (e.g. to fix an UNVERIFIED fact).
    """
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    entries = doc.get("modalities", doc if isinstance(doc, list) else None)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a 'modalities:' list")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "name" not in e:
            raise ValueError(f"{path}: entry {i} is not a mapping with a 'name'")
        e = dict(e)
        e.setdefault("folder_pattern", re.escape(e["name"]))
        e.setdefault("file_ext", "tif")
        e.setdefault("description", f"user-declared modality {e['name']}")
        e.setdefault("source", f"declared in {Path(path).name}")
        e["user_declared"] = True
        missing = [k for k in ("bands", "dtype", "kind", "resolution_m") if k not in e]
        if missing:
            raise ValueError(f"{path}: modality {e['name']!r} lacks {', '.join(missing)}")
        try:
            out.append(Modality.from_json(e))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: modality {e['name']!r}: {err}") from err
    return base.extended(out)
