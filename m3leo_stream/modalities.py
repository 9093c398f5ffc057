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
from typing import Any

import numpy as np

CHIP_SIZE_M = 4480.0
"""Side of an M3LEO chip in metres (448 px at 10 m)."""

SEASONS = ("winter", "spring", "summer", "fall")
MONTHS = tuple(f"{m:02d}" for m in range(1, 13))

RESERVED_NAMES = ("json", "key", "region", "split", "shard", "lon", "lat", "valid")
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
    file_band_names: tuple[str, ...] = ()  # band descriptions expected in upstream GeoTIFFs, when known
    band_select_pattern: str | None = None  # regex on GeoTIFF band descriptions; one band per matching year
    nc_group: str | None = None
    nc_variables: tuple[NcVariable, ...] = ()
    nc_select_dim: str | None = None  # a dimension chosen at build time (GUNW date pairs)
    unverified: tuple[str, ...] = ()
    user_declared: bool = False

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

    def is_nodata(self, array: np.ndarray) -> np.ndarray:
        """Boolean mask of nodata pixels (the nodata value, and NaN for float arrays)."""
        mask = np.zeros(array.shape, dtype=bool)
        if array.dtype.kind == "f":
            mask |= np.isnan(array)
        if self.nodata is not None and not (isinstance(self.nodata, float) and math.isnan(self.nodata)):
            mask |= array == self.nodata
        return mask

    def to_json(self) -> dict[str, Any]:
        """The entry as written into ``manifest.json``."""
        d = dataclasses.asdict(self)
        d["nc_variables"] = [
            {"name": v.name, "dims": [[k, list(vals)] for k, vals in v.dims], "band_name": v.band_name}
            for v in self.nc_variables
        ]
        d["special_values"] = {str(k): v for k, v in self.special_values.items()}
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
        if "nc_variables" in kw:
            kw["nc_variables"] = tuple(
                NcVariable(v["name"], tuple((k, tuple(vals)) for k, vals in v.get("dims", ())), v.get("band_name"))
                for v in kw["nc_variables"] or ()
            )
        if kw.get("nodata") == "nan":
            kw["nodata"] = float("nan")
        kw["resolution_m"] = float(kw["resolution_m"])
        return cls(**kw)


def _json_number(x: float | int | None) -> float | int | str | None:
    if isinstance(x, float) and math.isnan(x):
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
_S2_BANDS = tuple(f"{m}_{c}" for m in MONTHS for c in ("red", "green", "blue"))

_GSSIC_VARS = (
    NcVariable("amplitude", (("season", SEASONS), ("polarimetry", ("vv", "vh")))),
    NcVariable("coherence", (("season", SEASONS), ("deltadays", (12, 24, 36, 48)))),
    NcVariable("decaymodel", (("season", SEASONS), ("param", ("rho", "tau", "rmse")))),
    NcVariable("geometry", (("feature", ("inc", "lsmap")),)),
)
_GSSIC_BANDS = tuple(b for v in _GSSIC_VARS for b in v.band_names())


def _gssic_band_kinds() -> tuple[str, ...]:
    kinds = []
    for b in _GSSIC_BANDS:
        kinds.append("coherence" if b.startswith("coherence") else "continuous")
    return tuple(kinds)


def _gssic_units() -> tuple[str, ...]:
    units = []
    for b in _GSSIC_BANDS:
        if b.startswith("coherence"):
            units.append("1")
        elif b.startswith("geometry_inc"):
            units.append("deg")
        else:
            units.append("")
    return tuple(units)


_GUNW_VARS = (NcVariable("amplitude"), NcVariable("coherence"), NcVariable("unwrappedPhase"))
_WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
_WORLDCOVER_NAMES = (
    "tree cover", "shrubland", "grassland", "cropland", "built-up", "bare / sparse vegetation",
    "snow and ice", "permanent water bodies", "herbaceous wetland", "mangroves", "moss and lichen",
)

BUILTIN: tuple[Modality, ...] = (
    Modality(
        name="s1grd",
        folder_pattern=r"s1grd-(?P<year>\d{4})",
        file_ext="tif",
        bands=_S1_BANDS,
        file_band_names=_S1_FILE_BANDS,
        dtype="int16",
        kind="sar_db",
        units=("dB",) * 16,
        nodata=-32768,
        resolution_m=10.0,
        description="Sentinel-1 GRD seasonal median backscatter (sigma0, dB), ascending and descending orbits.",
        source="Google Earth Engine COPERNICUS/S1_GRD, seasonal medians (M3LEO s1grd-YYYY)",
        unverified=("storage scale of the int16 dB values (assumed 1 dB per unit)", "nodata value (assumed -32768)"),
    ),
    Modality(
        name="s2rgbm",
        folder_pattern=r"s2rgbm-(?P<year>\d{4})",
        file_ext="tif",
        bands=_S2_BANDS,
        file_band_names=_S2_BANDS,
        dtype="uint8",
        kind="optical",
        units=("DN (0-255)",) * 36,
        scale=(1 / 255,) * 36,
        nodata=None,
        resolution_m=10.0,
        description="Sentinel-2 L2A harmonized monthly cloudless median RGB, month-major (01_red, 01_green, ...).",
        source="Google Earth Engine COPERNICUS/S2_SR_HARMONIZED, monthly medians (M3LEO s2rgbm-YYYY)",
        unverified=("whether 0 marks missing months (treated as a valid value)",),
    ),
    Modality(
        name="gssic",
        folder_pattern=r"gssic",
        file_ext="nc",
        bands=_GSSIC_BANDS,
        band_kinds=_gssic_band_kinds(),
        units=_gssic_units(),
        dtype="float32",
        kind="coherence",
        nodata=float("nan"),
        resolution_m=90.0,
        nc_variables=_GSSIC_VARS,
        description="Global Seasonal Sentinel-1 Interferometric Coherence and Backscatter: seasonal amplitude, "
        "coherence at 12/24/36/48-day baselines, coherence decay model (rho, tau, rmse), incidence angle "
        "and layover/shadow map.",
        source="ASF GSSIC (Kellndorfer et al.), Dec 2019 - Nov 2020 seasons",
        unverified=("coherence scale (assumed 0-1 floats; set scale 0.01 for 0-100 bytes)", "amplitude units"),
    ),
    Modality(
        name="gunw",
        folder_pattern=r"gunw_(?P<start>\d{4}-\d{2}-\d{2})_(?P<end>\d{4}-\d{2}-\d{2})",
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
        description="ARIA Sentinel-1 geocoded unwrapped interferogram: amplitude, coherence and unwrapped phase of "
        "one date pair per chip, chosen at build time (the choice is recorded in each sample's json).",
        source="ASF ARIA S1 GUNW, one window per folder gunw_<start>_<end>",
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
        description="Above-ground biomass and its standard error.",
        source="ESA CCI Biomass",
        unverified=("units (CCI convention Mg/ha assumed)",),
    ),
    Modality(
        name="ghsbuilts",
        folder_pattern=r"(?:ghsbuilts|ghs-built-S)-(?P<year>\d{4})",
        file_ext="tif",
        bands=("built_surface",),
        units=("m2",),
        dtype="float32",
        kind="continuous",
        nodata=float("nan"),
        resolution_m=100.0,
        description="Built-up surface per 100 m cell.",
        source="JRC GHSL GHS-BUILT-S",
        unverified=("semantics (m2 of built-up surface per cell, GHS-BUILT-S convention)", "source dtype"),
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
        bands=("elevation",),
        units=("m",),
        dtype="int16",
        kind="continuous",
        nodata=-32768,
        resolution_m=89.6,
        description="SRTM elevation.",
        source="SRTM (CGIAR SRTM90 V4 per the upstream README)",
        unverified=("native resolution (README says both 90 m and 30 m)",),
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
