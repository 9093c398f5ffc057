"""Batched normalisation and augmentation on the batch's device, chosen per band kind from the modality registry.

DataLoader workers only read and decode; :class:`DeviceTransforms` does the rest on whatever device the batch is on
(CPU in tests, CUDA on the cluster), called by the DataModule in ``on_after_batch_transfer``. Per band kind:

- ``sar_db``: clip (fixed range, per-band patterns or stats percentiles), standardise; optional VV−VH channels.
- ``optical``: scale to physical units, standardise.  ``coherence``: clip to [0, 1], standardise.
- ``continuous`` inputs: standardise (optionally clipped); ``continuous`` targets: physical units, invalid → 0.
- ``phase``: (sin, cos) of the wrapped phase, or unwrapped phase minus its per-chip median; raw phase is never
  interpolated.
- ``categorical`` targets: upstream codes → 0..K−1 by a lookup table, nodata/unknown → ``ignore_index``;
  categorical inputs become one-hot channels.

Nodata and NaN give ``<modality>_valid`` masks; invalid input pixels are 0 (the mean) before any resampling, so no
NaN reaches a model. Geometry (random resized crop + resize onto the training grid in ONE ``grid_sample`` per
modality, then a dihedral flip/rotation by exact index ops) uses the same per-sample parameters for every modality
and mask of a sample; masks and labels are resampled with nearest, images bilinear. Random parameters come from a
``torch.Generator`` seeded by a hash of (seed, rank, step), drawn on the CPU (so CPU and CUDA agree), except the
noise fields, which are drawn on the device.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from m3leo_stream.modalities import BANDS_KEY, Modality

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CONFIG", "DeviceTransforms", "bands_needed", "build_device_transforms", "dihedral"]

DEFAULT_CONFIG: dict[str, Any] = {
    "ignore_index": -100,
    "stats_scope": "global",  # "global" or a region name of stats.json
    "grid": {
        "size": None,  # side of the common training grid in px; None = the largest input's canonical size
        "coarse_targets": "own",  # "own": targets coarser than the grid keep their grid; "grid": resize them
    },
    "kinds": {
        "sar_db": {"clip": "percentiles", "percentiles": [1, 99], "ratio": False},
        "optical": {"clip": None, "percentiles": [1, 99]},
        "coherence": {"clip": [0.0, 1.0], "percentiles": [1, 99]},
        "continuous": {"clip": None, "percentiles": [1, 99], "keep_special": False},
        "phase": {"mode": "sincos"},  # "sincos" | "rereference"
        "categorical": {},
    },
    "valid_reduce": "all",  # a pixel is valid when all ("all") or any ("any") of its selected bands are
    "modalities": {},  # per-modality overrides: bands, clip, percentiles, ratio, mean, std, size, mode, kind dicts
    "train": {
        "dihedral": True,
        "resized_crop": {"p": 0.5, "scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]},
        "noise": {"p": 0.5, "std": 0.1},
        "modality_dropout": {"p": 0.0},
    },
    "eval": {
        "dihedral": False,
        "resized_crop": {"p": 0.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0]},
        "noise": {"p": 0.0, "std": 0.0},
        "modality_dropout": {"p": 0.0},
    },
}

_KIND_KEYS = ("sar_db", "optical", "coherence", "continuous", "phase", "categorical")
_META_KEYS = ("key", "region", "lon", "lat", "valid")
_ZERO_STD_REPORTED: set[tuple[str, tuple[int, ...]]] = set()


# ---------------------------------------------------------------------------------------------------------------
# config helpers


def _plain(cfg: Any) -> Any:
    """A DictConfig/Mapping/sequence tree as plain dicts and lists."""
    try:  # omegaconf is a dependency, but keep plain Mappings working without it
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_plain(v) for v in cfg]
    return cfg


def _full_config(config: Any) -> dict[str, Any]:
    """A transforms config (Mapping, DictConfig or None) merged over :data:`DEFAULT_CONFIG`."""
    return _merge(DEFAULT_CONFIG, _plain(config) or {})


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _settings(cfg: Mapping[str, Any], m: Modality, kind: str) -> dict[str, Any]:
    """Settings of the bands of ``kind`` in modality ``m``: kind defaults < modality overrides < modality.kind."""
    over = dict(cfg["modalities"].get(m.name) or {})
    nested = {k: over.pop(k) for k in list(over) if k in _KIND_KEYS and isinstance(over[k], Mapping)}
    s = _merge(cfg["kinds"].get(kind, {}), over)
    return _merge(s, nested.get(kind, {}))


def _select_bands(m: Modality, patterns: Sequence[str] | str | None) -> list[int]:
    """Indices (storage order) of the bands matching any of the names / fnmatch patterns."""
    if patterns is None:
        return list(range(len(m.bands)))
    if isinstance(patterns, str):
        patterns = [patterns]
    keep = set()
    for p in patterns:
        hits = [i for i, b in enumerate(m.bands) if fnmatch.fnmatchcase(b, p)]
        if not hits:
            raise KeyError(f"transforms: band pattern {p!r} matches no band of modality {m.name!r}; "
                           f"bands: {', '.join(m.bands)}")
        keep.update(hits)
    return sorted(keep)


def _input_bands(cfg: Mapping[str, Any], m: Modality) -> list[int]:
    """Storage indices an input uses: ``modalities.<m>.bands``, by default every band but categorical flag bands
    inside a non-categorical modality (e.g. gssic ``geometry_lsmap``)."""
    patterns = (cfg["modalities"].get(m.name) or {}).get("bands")
    bands = _select_bands(m, patterns)
    if patterns is None and m.kind != "categorical":
        bands = [i for i in bands if m.band_kinds[i] != "categorical"]  # flag layers are not standardised
    return bands


def _target_bands(cfg: Mapping[str, Any], m: Modality) -> list[int]:
    """Storage indices a target uses: ``modalities.<m>.bands``, by default all."""
    return _select_bands(m, (cfg["modalities"].get(m.name) or {}).get("bands"))


def bands_needed(config: Mapping[str, Any] | None, modalities: Mapping[str, Modality], *, inputs: Sequence[str],
                 targets: Sequence[str] = ()) -> dict[str, list[int]]:
    """Per modality of ``inputs`` + ``targets``, the storage indices (sorted) of the bands that the device transforms
    built from ``config`` read: the loader need not fetch any other band. The same selection the transforms' plans
    make (``modalities.<m>.bands`` patterns; by default all bands, for inputs without categorical flag bands)."""
    cfg = _full_config(config)
    out = {n: _input_bands(cfg, modalities[n]) for n in inputs}
    out.update({n: _target_bands(cfg, modalities[n]) for n in targets})
    return out


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from a hash of ``parts`` (seed, rank, step, stream, ...): reproducible and independent."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (augmentation parameters, indices) on ``device`` without stalling the host: to a CUDA
    device through pinned memory and ``non_blocking`` (a plain ``.to`` from pageable memory waits until the stream
    has run everything queued before it, i.e. the previous training step)."""
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------
# per-modality plans


@dataclass
class _InputPlan:
    """How one input modality becomes standardised float channels."""

    name: str
    modality: Modality
    bands: list[int]  # selected storage indices
    scale: torch.Tensor  # (C,) physical per stored unit
    lo: torch.Tensor  # (C,) physical clip bounds (±inf = none)
    hi: torch.Tensor
    mean: torch.Tensor  # (C,) physical; phase/one-hot bands 0
    std: torch.Tensor  # (C,) physical; phase/one-hot bands 1
    linear: list[int]  # positions (in ``bands``) standardised linearly and kept as channels
    phase_sincos: list[int] = field(default_factory=list)
    phase_reref: list[int] = field(default_factory=list)
    ratio_pairs: list[tuple[int, int]] = field(default_factory=list)  # (vv pos, vh pos)
    ratio_mean: torch.Tensor | None = None
    ratio_std: torch.Tensor | None = None
    onehot_codes: list[int] = field(default_factory=list)
    invalid_values: list[float] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    out_mean: torch.Tensor | None = None  # (C',) for denormalize; 0 where not standardised
    out_std: torch.Tensor | None = None  # (C',) 1 where not standardised
    in_px: int = 0
    out_px: int = 0
    noise: float = 1.0
    can_be_invalid: bool = True  # nodata/special values or a float dtype


@dataclass
class _TargetPlan:
    name: str
    modality: Modality
    bands: list[int]
    categorical: bool
    scale: torch.Tensor | None = None
    lut: torch.Tensor | None = None  # code + lut_offset → class index or ignore
    lut_offset: int = 0
    codes: list[int] = field(default_factory=list)
    invalid_values: list[float] = field(default_factory=list)
    in_px: int = 0
    out_px: int = 0


def _band_stats(stats: Mapping[str, Any], m: Modality, scope: str) -> dict[str, Any] | None:
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


def _stat(st: dict[str, Any] | None, m: Modality, band: str, key: str, pct: float | None = None) -> float:
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


def _per_band(value: Any, n: int, what: str, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) != n:
        raise ValueError(f"transforms: {what} of modality {name!r} has {len(value)} entries for {n} selected bands")
    return value


def _clip_bounds(spec: Any, m: Modality, band: str, s: Mapping[str, Any], st, scale: float) -> tuple[float, float]:
    if spec is None:
        return (-math.inf, math.inf)
    if isinstance(spec, Mapping):  # {band-name token or fnmatch pattern: spec}; the first match wins
        for pat, sub in spec.items():
            if pat in band.split("_") or fnmatch.fnmatchcase(band, pat):
                return _clip_bounds(sub, m, band, s, st, scale)
        return (-math.inf, math.inf)
    if spec == "percentiles":
        p0, p1 = s.get("percentiles", [1, 99])
        return (_stat(st, m, band, "", p0) * scale, _stat(st, m, band, "", p1) * scale)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        lo, hi = (-math.inf if spec[0] is None else float(spec[0]), math.inf if spec[1] is None else float(spec[1]))
        return (lo, hi)
    raise ValueError(f"transforms: clip of modality {m.name!r} must be null, 'percentiles', [lo, hi] or "
                     f"{{band token or pattern: ...}}, got {spec!r}")


def _invalid_values(m: Modality, keep_special: bool) -> list[float]:
    vals = []
    if m.nodata is not None and not (isinstance(m.nodata, float) and math.isnan(m.nodata)):
        vals.append(float(m.nodata))
    if not keep_special:
        vals.extend(float(k) for k in m.special_values)
    return vals


def _input_plan(cfg: Mapping[str, Any], m: Modality, st, grid: int) -> _InputPlan:
    over = cfg["modalities"].get(m.name) or {}
    bands = _input_bands(cfg, m)
    n = len(bands)
    names = [m.bands[i] for i in bands]
    kinds = [m.band_kinds[i] for i in bands]
    scale = [float(m.scale[i]) for i in bands]
    bad = [b for b, s in zip(names, scale) if not s > 0]
    if bad:
        raise ValueError(f"transforms: modality {m.name!r} has non-positive scale for bands {bad}")
    plan_kw: dict[str, Any] = {}
    lo, hi, mean, std = [-math.inf] * n, [math.inf] * n, [0.0] * n, [1.0] * n
    linear, sincos, reref = [], [], []
    onehot: list[int] = []
    if m.kind == "categorical":
        if n != 1:
            raise ValueError(f"transforms: categorical input {m.name!r} needs exactly one selected band")
        onehot = list(m.class_codes)
    user_mean = _per_band(over.get("mean"), n, "mean", m.name)
    user_std = _per_band(over.get("std"), n, "std", m.name)
    for j, (b, k) in enumerate(zip(names, kinds)):
        if m.kind == "categorical":
            break
        if k == "categorical":
            raise ValueError(f"transforms: band {b!r} of input {m.name!r} is categorical inside a "
                             f"{m.kind} modality; select it out with transforms.modalities.{m.name}.bands")
        s = _settings(cfg, m, k)
        if k == "phase":
            mode = s.get("mode", "sincos")
            if mode == "sincos":
                sincos.append(j)
                continue
            if mode != "rereference":
                raise ValueError(f"transforms: phase mode of {m.name!r} must be 'sincos' or 'rereference', "
                                 f"got {mode!r}")
            reref.append(j)
            std[j] = user_std[j] if user_std else _stat(st, m, b, "std") * scale[j]
            continue
        lo[j], hi[j] = _clip_bounds(s.get("clip"), m, b, s, st, scale[j])
        if k == "coherence":
            lo[j], hi[j] = max(lo[j], 0.0), min(hi[j], 1.0)
        mean[j] = user_mean[j] if user_mean else _stat(st, m, b, "mean") * scale[j]
        std[j] = user_std[j] if user_std else _stat(st, m, b, "std") * scale[j]
        linear.append(j)
    zero = [j for j in range(n) if not std[j] > 0]
    if zero and (m.name, tuple(zero)) not in _ZERO_STD_REPORTED:  # once per process, not per transforms instance
        _ZERO_STD_REPORTED.add((m.name, tuple(zero)))
        log.warning("transforms: %r bands %s have std 0 (constant in stats.json); normalised with std 1", m.name,
                    [names[j] for j in zero])
    for j in zero:
        std[j] = 1.0
    channels = [names[j] for j in linear]
    out_mean = [mean[j] for j in linear]
    out_std = [std[j] for j in linear]
    for j in sincos:
        channels += [f"{names[j]}_sin", f"{names[j]}_cos"]
        out_mean += [0.0, 0.0]
        out_std += [1.0, 1.0]
    for j in reref:
        channels.append(f"{names[j]}_reref")
        out_mean.append(0.0)
        out_std.append(std[j])
    pairs = []
    if m.kind == "sar_db" and _settings(cfg, m, "sar_db").get("ratio"):
        for j, b in enumerate(names):
            if "_vv" in b and kinds[j] == "sar_db":
                partner = b.replace("_vv", "_vh")
                if partner in names:
                    pairs.append((j, names.index(partner)))
        if not pairs:
            raise ValueError(f"transforms: ratio requested for {m.name!r} but no selected band has both a _vv "
                             f"and a _vh version")
        rm = [mean[a] - mean[b] for a, b in pairs]
        rs = [math.sqrt(std[a] ** 2 + std[b] ** 2) for a, b in pairs]  # upper bound: VV and VH correlate
        plan_kw.update(ratio_mean=torch.tensor(rm), ratio_std=torch.tensor(rs))
        channels += [names[a].replace("_vv", "_vv-vh") for a, _ in pairs]
        out_mean += rm
        out_std += rs
    if onehot:
        names_k = list(m.class_names) or [str(c) for c in onehot]
        channels = names_k
        out_mean, out_std = [0.0] * len(onehot), [1.0] * len(onehot)
    keep_special = bool(_settings(cfg, m, m.kind).get("keep_special", False))
    return _InputPlan(
        name=m.name, modality=m, bands=bands, scale=torch.tensor(scale), lo=torch.tensor(lo), hi=torch.tensor(hi),
        mean=torch.tensor(mean), std=torch.tensor(std), linear=linear, phase_sincos=sincos, phase_reref=reref,
        ratio_pairs=pairs, onehot_codes=onehot, invalid_values=_invalid_values(m, keep_special), channels=channels,
        out_mean=torch.tensor(out_mean), out_std=torch.tensor(out_std), in_px=m.canonical_px,
        out_px=int(over.get("size") or grid), noise=float(over.get("noise", 0.0 if onehot else 1.0)),
        can_be_invalid=bool(_invalid_values(m, keep_special)) or m.np_dtype.kind == "f", **plan_kw,
    )


def _lut(m: Modality, ignore: int) -> tuple[torch.Tensor | None, int]:
    dt = m.np_dtype
    if dt.kind not in "iu" or dt.itemsize > 2:
        return None, 0
    info = __import__("numpy").iinfo(dt)
    offset = -int(info.min)
    lut = torch.full((int(info.max) - int(info.min) + 1,), ignore, dtype=torch.long)
    for k, code in enumerate(m.class_codes):
        if info.min <= code <= info.max:
            lut[code + offset] = k
    if m.nodata is not None and not (isinstance(m.nodata, float) and math.isnan(m.nodata)):
        if info.min <= m.nodata <= info.max:
            lut[int(m.nodata) + offset] = ignore
    return lut, offset


def _target_plan(cfg: Mapping[str, Any], m: Modality, grid: int) -> _TargetPlan:
    over = cfg["modalities"].get(m.name) or {}
    bands = _target_bands(cfg, m)
    px = m.canonical_px
    if over.get("size"):
        out_px = int(over["size"])
    elif px < grid and cfg["grid"].get("coarse_targets", "own") == "own":
        out_px = px
    else:
        out_px = grid
    keep_special = bool(_settings(cfg, m, m.kind).get("keep_special", False))
    if m.is_categorical:
        if len(bands) != 1:
            raise ValueError(f"transforms: categorical target {m.name!r} needs exactly one selected band")
        lut, off = _lut(m, int(cfg["ignore_index"]))
        return _TargetPlan(m.name, m, bands, True, lut=lut, lut_offset=off, codes=list(m.class_codes),
                           invalid_values=_invalid_values(m, True), in_px=px, out_px=out_px)
    return _TargetPlan(m.name, m, bands, False, scale=torch.tensor([float(m.scale[i]) for i in bands]),
                       invalid_values=_invalid_values(m, keep_special), in_px=px, out_px=out_px)


# ---------------------------------------------------------------------------------------------------------------
# geometry


def dihedral(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Apply dihedral element ``d[i]`` (0..7: bit 2 transpose, bit 0 flip W, bit 1 flip H) to sample ``i`` of
    ``x`` (B, ..., H, W) with H == W. Exact (pure indexing). ``d`` lives on the CPU."""
    d = d.to("cpu", torch.long)
    if not bool(d.any()):
        return x
    out = torch.empty_like(x)
    for k in torch.unique(d).tolist():
        idx = torch.nonzero(d == k).flatten()
        xs = x[to_device(idx, x.device)] if len(idx) < len(d) else x
        if k & 4:
            xs = xs.transpose(-1, -2)
        if k & 1:
            xs = xs.flip(-1)
        if k & 2:
            xs = xs.flip(-2)
        if len(idx) < len(d):
            out[to_device(idx, x.device)] = xs
        else:
            out.copy_(xs)
    return out


def _warp(x: torch.Tensor, theta: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resample (B, C, H, W) float ``x`` onto ``size``² through per-sample affine ``theta`` (B, 2, 3)."""
    grid = F.affine_grid(to_device(theta, x.device).to(x.dtype), [x.shape[0], x.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------


class DeviceTransforms:
    """The transform pipeline for one split (train or eval); see the module docstring and README
    ``## Device transforms``. Call as ``t(batch, step=global_step)``."""

    def __init__(self, config: Mapping[str, Any], modalities: Mapping[str, Modality], stats: Mapping[str, Any],
                 *, inputs: Sequence[str], targets: Sequence[str], train: bool, seed: int = 0, rank: int = 0):
        cfg = _full_config(config)
        both = set(inputs) & set(targets)
        if both:
            raise ValueError(f"transforms: {sorted(both)} listed both as inputs and as targets")
        unknown = set(cfg["modalities"]) - set(inputs) - set(targets)
        if unknown:
            log.info("transforms: overrides for modalities not in use ignored: %s", sorted(unknown))
        self.config = cfg
        self.train = bool(train)
        self.seed = int(seed)
        self.rank = int(rank)
        self.ignore_index = int(cfg["ignore_index"])
        self.aug = cfg["train" if train else "eval"]
        scope = cfg.get("stats_scope", "global")
        in_mods = [modalities[n] for n in inputs]
        tg_mods = [modalities[n] for n in targets]
        grid = cfg["grid"].get("size") or max([m.canonical_px for m in in_mods] or
                                              [m.canonical_px for m in tg_mods] or [1])
        self.grid = int(grid)
        self.inputs = {m.name: _input_plan(cfg, m, _band_stats(stats, m, scope), self.grid) for m in in_mods}
        self.targets = {m.name: _target_plan(cfg, m, self.grid) for m in tg_mods}
        self.channels: dict[str, list[str]] = {n: list(p.channels) for n, p in self.inputs.items()}
        self.num_classes: dict[str, int] = {n: len(p.codes) for n, p in self.targets.items() if p.categorical}
        self.class_names: dict[str, list[str]] = {
            n: list(p.modality.class_names) or [str(c) for c in p.codes]
            for n, p in self.targets.items() if p.categorical
        }
        self.out_px: dict[str, int] = {**{n: p.out_px for n, p in self.inputs.items()},
                                       **{n: p.out_px for n, p in self.targets.items()}}
        self._dev: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._positions: dict[tuple[str, tuple[int, ...], str], torch.Tensor] = {}
        self._calls = 0

    def __repr__(self) -> str:
        return (f"DeviceTransforms(train={self.train}, grid={self.grid}, inputs={list(self.inputs)}, "
                f"targets={list(self.targets)}, rank={self.rank})")

    # -- random parameters -------------------------------------------------------------------------------------

    def generator(self, step: int, stream: str = "params", device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from (seed, rank, step, stream): reproducible, different across ranks."""
        g = torch.Generator(device=device)
        g.manual_seed(seed_of(self.seed, self.rank, step, stream))
        return g

    def sample_params(self, batch_size: int, step: int) -> dict[str, Any]:
        """The per-sample augmentation parameters of one step (all on the CPU)."""
        g = self.generator(step)
        a = self.aug
        b = batch_size
        p: dict[str, Any] = {"dihedral": torch.zeros(b, dtype=torch.long)}
        if a.get("dihedral"):
            p["dihedral"] = torch.randint(0, 8, (b,), generator=g)
        rc = a.get("resized_crop") or {}
        crop = torch.rand(b, generator=g) < float(rc.get("p", 0.0))
        s_lo, s_hi = rc.get("scale", [1.0, 1.0])
        r_lo, r_hi = rc.get("ratio", [1.0, 1.0])
        area = s_lo + (s_hi - s_lo) * torch.rand(b, generator=g, dtype=torch.float64)
        logr = math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * torch.rand(b, generator=g, dtype=torch.float64)
        w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
        h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
        x0 = (1 - w) * torch.rand(b, generator=g, dtype=torch.float64)
        y0 = (1 - h) * torch.rand(b, generator=g, dtype=torch.float64)
        box = torch.stack([x0, y0, w, h], 1)
        box[~crop] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        p["crop"], p["box"] = crop, box
        nz = a.get("noise") or {}
        noisy = torch.rand(b, generator=g) < float(nz.get("p", 0.0))
        p["noise_std"] = {}
        for name, plan in self.inputs.items():
            sd = float(nz.get("std", 0.0)) * plan.noise * torch.rand(b, len(plan.channels), generator=g)
            p["noise_std"][name] = sd * noisy[:, None]
        names = list(self.inputs)
        md = (a.get("modality_dropout") or {}).get("p", 0.0)
        if isinstance(md, Mapping):  # per input, e.g. {gssic: 0.5}; inputs not named are not dropped
            unknown = sorted(set(md) - set(names))
            if unknown:
                raise KeyError(f"transforms: modality_dropout.p names {unknown}, which are not inputs ({names})")
            rates = torch.tensor([float(md.get(n, 0.0)) for n in names])
        else:
            rates = torch.full((len(names),), float(md))
        drop = torch.rand(b, len(names), generator=g) < rates
        if names:
            keep = torch.randint(0, len(names), (b,), generator=g)
            all_dropped = drop.all(1)
            drop[all_dropped, keep[all_dropped]] = False  # every sample keeps at least one input
        p["drop"] = {n: drop[:, i] for i, n in enumerate(names)}
        p["noisy"] = noisy
        p["noise_any"] = bool(noisy.any()) and float(nz.get("std", 0.0)) > 0
        return p

    def _dropout(self, drop: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
                 dev: torch.device) -> dict[str, torch.Tensor]:
        """The modality-dropout draw on the device; a sample whose present inputs would all be dropped keeps them
        all (the draw cannot see which members a sample lacks without reading the device)."""
        names = list(self.inputs)
        out = {n: to_device(drop[n], dev) for n in names}
        if not present or not names:
            return out
        ones = torch.ones_like(out[names[0]])
        pres = torch.stack([present.get(n, ones) for n in names], 1)
        d = torch.stack([out[n] for n in names], 1)
        d = d & (pres & ~d).any(1, keepdim=True)
        return {n: d[:, i] for i, n in enumerate(names)}

    @staticmethod
    def theta(box: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2, 3) affine maps from output to input normalised coordinates for crop boxes (x0, y0, w, h),
        optionally preceded by dihedral elements ``d`` (the same element :func:`dihedral` applies)."""
        x0, y0, w, h = box.unbind(1)
        t = torch.zeros(box.shape[0], 2, 3, dtype=torch.float64)
        t[:, 0, 0], t[:, 0, 2] = w, -1 + 2 * x0 + w
        t[:, 1, 1], t[:, 1, 2] = h, -1 + 2 * y0 + h
        if d is not None:
            # output (u, v) → flip v (bit 1) → flip u (bit 0) → swap (bit 2) → crop box
            m = torch.eye(2, dtype=torch.float64).repeat(len(d), 1, 1)
            m[:, 1, 1] = torch.where(d & 2 > 0, -1.0, 1.0)
            m[:, 0, 0] = torch.where(d & 1 > 0, -1.0, 1.0)
            swap = (d & 4) > 0
            m[swap] = m[swap].flip(1)
            t[:, :, :2] = t[:, :, :2] @ m
        return t.float()

    # -- normalisation -----------------------------------------------------------------------------------------

    def _buffers(self, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        key = (name, str(device))
        if key not in self._dev:
            if name in self.inputs:
                p = self.inputs[name]
                v = lambda t: t.to(device, torch.float32).view(1, -1, 1, 1)  # noqa: E731
                scale, lo, hi, mean, std = p.scale, p.lo, p.hi, p.mean, p.std
                # standardise stored values in one fused step: clamp(x*scale, lo, hi) → (x*scale − mean)/std
                # (clip bounds are converted to stored units; scales are positive)
                self._dev[key] = {
                    "lo": v(lo / scale), "hi": v(hi / scale), "a": v(scale / std), "b": v(-mean / std),
                    "scale": v(scale),
                    "linear": torch.tensor(p.linear, device=device, dtype=torch.long),
                    "out_mean": v(p.out_mean), "out_std": v(p.out_std),
                }
                if p.ratio_pairs:
                    self._dev[key]["ratio_a"] = torch.tensor([i for i, _ in p.ratio_pairs], device=device)
                    self._dev[key]["ratio_b"] = torch.tensor([j for _, j in p.ratio_pairs], device=device)
                    self._dev[key]["ratio_mean"] = v(p.ratio_mean)
                    self._dev[key]["ratio_std"] = v(p.ratio_std)
            else:
                p = self.targets[name]
                d: dict[str, torch.Tensor] = {}
                if p.lut is not None:
                    d["lut"] = p.lut.to(device)
                if p.codes:
                    d["codes"] = torch.tensor(p.codes, device=device)
                if p.scale is not None:
                    d["scale"] = p.scale.to(device).view(1, -1, 1, 1)
                self._dev[key] = d
        return self._dev[key]

    def _band_valid(self, x: torch.Tensor, invalid_values: Sequence[float]) -> torch.Tensor | None:
        """(B, C, H, W) bool of valid stored values, or None when every value is valid."""
        bad = None
        if x.is_floating_point():
            bad = ~torch.isfinite(x)
        for v in invalid_values:
            hit = x == v
            bad = hit if bad is None else bad | hit
        return None if bad is None else ~bad

    @staticmethod
    def _bands_present(band_valid: torch.Tensor | None) -> torch.Tensor | None:
        """(B, C) bool: the chip has at least one valid pixel of the band. A band without one is missing (a season,
        orbit or month without data: what the build records as the member's ``missing_bands``)."""
        return None if band_valid is None else band_valid.flatten(2).any(2)

    def _reduce_valid(self, band_valid: torch.Tensor | None, x: torch.Tensor,
                      present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, H, W): a pixel is valid when all (``valid_reduce: all``) or any of the chip's bands that are not
        missing are valid there (a missing band does not invalidate the rest; a chip with every band missing has no
        valid pixel)."""
        if band_valid is None:
            return torch.ones(x.shape[0], 1, x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
        if self.config.get("valid_reduce", "all") == "any":
            return band_valid.any(1, keepdim=True)
        if present is None:
            return band_valid.all(1, keepdim=True)
        ok = (band_valid | ~present[:, :, None, None]).all(1, keepdim=True)
        return ok & present.any(1).view(-1, 1, 1, 1)

    def _select(self, name: str, x: torch.Tensor, wanted: Sequence[int], m: Modality,
                bands: Sequence[str] | None) -> torch.Tensor:
        """The ``wanted`` bands (storage indices) of stored ``x`` (B, C, H, W), which carries either every band of
        ``m`` (``bands`` None) or the bands ``bands`` names, in storage order (the batch's ``bands`` entry: a loader
        that read only some bands)."""
        if x.dim() != 4:
            raise ValueError(f"transforms: {name!r} has shape {tuple(x.shape)}; expected (B, C, H, W)")
        if bands is None:
            if x.shape[1] != len(m.bands):
                raise ValueError(f"transforms: {name!r} has shape {tuple(x.shape)}; expected (B, {len(m.bands)}, H, "
                                 f"W) (all bands), or a batch whose {BANDS_KEY!r} entry names the {x.shape[1]} bands "
                                 "it carries")
            pos = list(wanted)
        else:
            names = list(bands)
            if len(names) != x.shape[1]:
                raise ValueError(f"transforms: {name!r} has {x.shape[1]} bands (shape {tuple(x.shape)}) but the "
                                 f"batch's {BANDS_KEY!r} entry names {len(names)}: {names}")
            order = {b: i for i, b in enumerate(m.bands)}
            unknown = [b for b in names if b not in order]
            if unknown or len(set(names)) != len(names) or [order[b] for b in names] != sorted(order[b] for b in names):
                raise ValueError(f"transforms: the batch's {BANDS_KEY!r} entry for {name!r} must name distinct bands "
                                 f"of the modality in storage order; got {names}"
                                 + (f" (unknown: {unknown})" if unknown else ""))
            at = {b: j for j, b in enumerate(names)}
            need = [m.bands[i] for i in wanted]
            missing = [b for b in need if b not in at]
            if missing:
                raise ValueError(f"transforms: the batch carries bands {names} of {name!r}, but these transforms "
                                 f"use {need}; missing {missing}. Was the loader set up with another transforms "
                                 "config (band selection) than these transforms?")
            pos = [at[b] for b in need]
        if pos == list(range(x.shape[1])):
            return x
        key = (name, tuple(pos), str(x.device))
        if key not in self._positions:
            self._positions[key] = torch.tensor(pos, device=x.device, dtype=torch.long)
        return x.index_select(1, self._positions[key])

    def normalize_input(self, name: str, x_stored: torch.Tensor,
                        bands: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (B, C, H, W) of input ``name`` → (standardised channels, valid (B, 1, H, W)). ``x_stored`` holds
        all bands of the modality, or those ``bands`` names (storage order, at least the ones these transforms use):
        the result is the same."""
        y, valid, _ = self.normalize_input_channels(name, x_stored, bands)
        return y, valid

    def normalize_input_channels(self, name: str, x_stored: torch.Tensor, bands: Sequence[str] | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`normalize_input` plus (B, C') bool per output channel: False where a band it derives from is
        missing in the chip (all nodata), ``None`` when no band can be. Missing bands are 0 in the output."""
        p = self.inputs[name]
        buf = self._buffers(name, x_stored.device)
        x = self._select(name, x_stored, p.bands, p.modality, bands)
        band_valid = self._band_valid(x, p.invalid_values)
        present = self._bands_present(band_valid)
        valid = self._reduce_valid(band_valid, x, present)
        if p.onehot_codes:
            codes = to_device(torch.tensor(p.onehot_codes, dtype=x.dtype), x.device).view(1, -1, 1, 1)
            y = (x == codes).float()  # nodata and unknown codes: all zeros
            return y, valid, None if present is None else present[:, :1].expand(-1, y.shape[1])
        if x.is_floating_point() and band_valid is not None:
            xf = torch.where(band_valid, x.float(), 0.0)  # NaN out before any arithmetic
        else:
            xf = x.to(torch.float32, copy=True)  # integer nodata is finite: masked at the end
        # few full passes, in place (memory-bound on every device): clamp, ratio, standardise, mask
        parts = []
        head_idx = p.phase_sincos + p.phase_reref
        heads = {j: xf[:, j:j + 1] * float(p.scale[j]) for j in head_idx}  # phase, before standardisation
        clipped = torch.clamp_(xf, buf["lo"], buf["hi"])
        ratio = None
        if p.ratio_pairs:
            a, b = buf["ratio_a"], buf["ratio_b"]
            sa, sb = buf["scale"].index_select(1, a), buf["scale"].index_select(1, b)
            ratio = (clipped.index_select(1, a) * sa - clipped.index_select(1, b) * sb - buf["ratio_mean"])
            ratio /= buf["ratio_std"]
            if band_valid is not None:
                ratio.masked_fill_(~(band_valid.index_select(1, a) & band_valid.index_select(1, b)), 0.0)
        z = clipped.mul_(buf["a"]).add_(buf["b"])
        if band_valid is not None:
            z.masked_fill_(~band_valid, 0.0)
        parts.append(z if len(p.linear) == z.shape[1] else z.index_select(1, buf["linear"]))
        for j in p.phase_sincos:
            ph = heads[j]
            s, c = torch.sin(ph), torch.cos(ph)
            if band_valid is not None:
                s, c = s.masked_fill(~band_valid[:, j:j + 1], 0.0), c.masked_fill(~band_valid[:, j:j + 1], 0.0)
            parts += [s, c]
        for j in p.phase_reref:
            ph = heads[j]
            ok = band_valid[:, j:j + 1] if band_valid is not None else torch.ones_like(ph, dtype=torch.bool)
            ref = torch.nanmedian(torch.where(ok, ph, torch.nan).flatten(1), dim=1).values
            ref = torch.nan_to_num(ref, nan=0.0).view(-1, 1, 1, 1)  # all-invalid chips: nothing to reference
            parts.append(((ph - ref) / float(p.std[j])).masked_fill(~ok, 0.0))
        if ratio is not None:
            parts.append(ratio)
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if present is None:
            return y, valid, None
        chans = [present if len(p.linear) == present.shape[1] else present.index_select(1, buf["linear"])]
        for j in p.phase_sincos:
            chans += [present[:, j:j + 1]] * 2
        for j in p.phase_reref:
            chans.append(present[:, j:j + 1])
        if p.ratio_pairs:
            chans.append(present.index_select(1, buf["ratio_a"]) & present.index_select(1, buf["ratio_b"]))
        return y, valid, chans[0] if len(chans) == 1 else torch.cat(chans, 1)

    def prepare_target(self, name: str, x_stored: torch.Tensor,
                       bands: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored target (all bands, or those ``bands`` names) → (int64 (B, H, W) classes | float32 (B, C, H, W)
        physical, valid (B, 1, H, W))."""
        y, valid, _ = self.prepare_target_channels(name, x_stored, bands)
        return y, valid

    def prepare_target_channels(self, name: str, x_stored: torch.Tensor, bands: Sequence[str] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`prepare_target` plus (B, C) bool per band of a continuous target: False where the chip lacks the
        band (all nodata); ``None`` for categorical targets or when no band can be missing."""
        p = self.targets[name]
        buf = self._buffers(name, x_stored.device)
        x = self._select(name, x_stored, p.bands, p.modality, bands)
        if p.categorical:
            x = x[:, 0]
            if "lut" in buf:
                y = buf["lut"][x.long() + p.lut_offset]
            else:  # wide integer or float codes: search the sorted code list
                codes = buf["codes"]
                order = torch.argsort(codes)
                sc = codes[order].to(x.dtype)
                pos = torch.searchsorted(sc, x.contiguous()).clamp(max=len(sc) - 1)
                y = torch.where(sc[pos] == x, order[pos], self.ignore_index)
                for v in p.invalid_values:
                    y = torch.where(x == v, self.ignore_index, y)
            return y, (y != self.ignore_index).unsqueeze(1), None
        band_valid = self._band_valid(x, p.invalid_values)
        present = self._bands_present(band_valid)
        valid = self._reduce_valid(band_valid, x, present)
        y = x.float() * buf["scale"]
        if band_valid is not None:
            y = torch.where(band_valid, y, 0.0)
        return y, valid, present

    def denormalize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of the input standardisation: channels of ``name`` back in physical units (sin/cos and one-hot
        channels unchanged). Accepts (B, C, H, W) or (C, H, W)."""
        p = self.inputs[name]
        mean, std = p.out_mean.to(tensor.device), p.out_std.to(tensor.device)
        shape = (-1, 1, 1) if tensor.dim() == 3 else (1, -1, 1, 1)
        return tensor * std.view(shape) + mean.view(shape)

    # -- the pipeline ------------------------------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, Any], step: int | None = None) -> dict[str, Any]:
        if step is None:
            step = self._calls
        self._calls += 1
        out: dict[str, Any] = dict(batch)
        # which stored bands the batch carries (a loader reading only the bands these transforms use); the output's
        # channels are described by ``self.channels`` instead
        carried = out.pop(BANDS_KEY, None) or {}
        names = list(self.inputs) + list(self.targets)
        if not names:
            return out
        first = batch[names[0]] if names[0] in batch else None
        if first is None:
            raise KeyError(f"transforms: batch has no {names[0]!r} (keys: {', '.join(map(str, batch))})")
        bsz = first.shape[0]
        params = self.sample_params(bsz, step)
        d = params["dihedral"]
        # one resampling pass per tensor: crop + resize + dihedral folded into one grid when a warp is needed
        # anyway; otherwise the dihedral element is applied by exact index ops
        theta = self.theta(params["box"], d)
        any_crop = bool(params["crop"].any())
        dev = first.device

        def geom(x: torch.Tensor, in_px: int, out_px: int, mode: str) -> torch.Tensor:
            if any_crop or in_px != out_px or x.shape[-1] != out_px:
                return _warp(x, theta, out_px, mode)
            return dihedral(x, d)

        def geom_mask(v: torch.Tensor, in_px: int, out_px: int) -> torch.Tensor:
            if any_crop or v.shape[-1] != out_px:
                return _warp(v.float(), theta, out_px, "nearest") > 0.5
            return dihedral(v, d)

        # samples lacking an optional member (``<mod>_present`` False, from the loader): zeros, nothing valid
        present = {n: batch[f"{n}_present"].to(dev).bool().view(-1) for n in names if f"{n}_present" in batch}
        drop_dev = self._dropout(params["drop"], present, dev) if self.train else {}
        noise_gen = None
        for name, p in self.inputs.items():
            if name not in batch:
                raise KeyError(f"transforms: batch has no input {name!r} (keys: {', '.join(map(str, batch))})")
            y, valid, chan_valid = self.normalize_input_channels(name, batch[name], carried.get(name))
            warped = any_crop or y.shape[-1] != p.out_px
            y = geom(y, y.shape[-1], p.out_px, "bilinear")
            valid = geom_mask(valid, valid.shape[-1], p.out_px)
            if warped and p.can_be_invalid:
                y.mul_(valid)  # resampling next to invalid pixels must not leak; invalid stays 0 (the mean)
            if params["noise_any"]:
                if noise_gen is None:
                    noise_gen = self.generator(step, "noise", dev)
                idx = torch.nonzero(params["noisy"]).flatten()
                sd = to_device(params["noise_std"][name][idx], dev).view(len(idx), -1, 1, 1)
                di = to_device(idx, dev)
                noise = torch.randn((len(idx), *y.shape[1:]), generator=noise_gen, device=dev, dtype=y.dtype)
                noise.mul_(sd)
                if p.can_be_invalid:
                    noise.mul_(valid.index_select(0, di))
                y.index_add_(0, di, noise)  # per-band noise on the noisy samples only
                del noise
            if self.train:
                drop = params["drop"][name]
                if bool(drop.any()):  # host-side draw: no device value is read
                    y.mul_((~drop_dev[name]).view(-1, 1, 1, 1))
                out[f"{name}_dropped"] = drop_dev[name]
            if name in present:
                pr = present[name]
                valid = valid & pr.view(-1, 1, 1, 1)
                chan_valid = pr.view(-1, 1).expand(-1, y.shape[1]) if chan_valid is None else \
                    chan_valid & pr.view(-1, 1)
                out[f"{name}_present"] = pr
            if chan_valid is None:
                chan_valid = torch.ones(bsz, y.shape[1], dtype=torch.bool, device=dev)
            else:  # missing bands and absent members stay 0 after noise and resampling
                y.mul_(chan_valid.view(*chan_valid.shape, 1, 1))
            out[name] = y
            out[f"{name}_valid"] = valid
            out[f"{name}_channel_valid"] = chan_valid
        for name, p in self.targets.items():
            if name not in batch:
                raise KeyError(f"transforms: batch has no target {name!r} (keys: {', '.join(map(str, batch))})")
            y, valid, chan = self.prepare_target_channels(name, batch[name], carried.get(name))
            if not p.categorical:  # which target bands the chip has (a missing one is never scored)
                out[f"{name}_channel_valid"] = chan if chan is not None else \
                    torch.ones(bsz, y.shape[1], dtype=torch.bool, device=dev)
            if name in present:
                pr = present[name]
                out[f"{name}_present"] = pr
                if p.categorical:
                    y = y.masked_fill(~pr.view(-1, 1, 1), self.ignore_index)
                else:
                    y = y * pr.view(-1, 1, 1, 1)
                    valid = valid & pr.view(-1, 1, 1, 1)
                    out[f"{name}_channel_valid"] = out[f"{name}_channel_valid"] & pr.view(-1, 1)
            if p.categorical:
                if any_crop or y.shape[-1] != p.out_px:
                    # class indices and -100 are exact in float32; nearest never mixes them
                    y = _warp(y.unsqueeze(1).float(), theta, p.out_px, "nearest").squeeze(1).round().long()
                else:
                    y = dihedral(y, d)
                valid = (y != self.ignore_index).unsqueeze(1)
            else:
                y = geom(y, y.shape[-1], p.out_px, "bilinear")
                valid = geom_mask(valid, valid.shape[-1], p.out_px)
                y = y * valid
            out[name] = y
            out[f"{name}_valid"] = valid
        return out


def build_device_transforms(config: Mapping[str, Any] | None, modalities: Mapping[str, Modality],
                            stats: Mapping[str, Any], *, inputs: Sequence[str], targets: Sequence[str], train: bool,
                            seed: int = 0, rank: int = 0) -> DeviceTransforms:
    """The device transforms for ``inputs``/``targets`` (see :class:`DeviceTransforms`).

    ``config`` is a Mapping or DictConfig (``configs/transforms/*.yaml``), merged over :data:`DEFAULT_CONFIG`;
    ``modalities`` the registry of the shard root; ``stats`` the parsed ``stats.json``.
    """
    return DeviceTransforms(config or {}, modalities, stats, inputs=inputs, targets=targets, train=train,
                            seed=seed, rank=rank)
