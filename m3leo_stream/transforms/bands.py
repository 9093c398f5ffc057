"""Band plans: per modality, one record per selected stored band saying how it becomes output channels.

A plan is built once from the modality registry (names, kinds, scale, nodata, polarisation pairs), the shard root's
``stats.json`` and the transforms config; applying it is :mod:`.normalise`. Which bands a plan selects is also what
the loader reads (:func:`bands_needed`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from m3leo_stream.modalities import Modality, nodata_value, polarisation_pairs

from .defaults import full_config, overrides, settings
from .stats import band_stats, stat

log = logging.getLogger(__name__)

__all__ = ["BandPlan", "InputPlan", "RatioPlan", "TargetPlan", "bands_needed", "input_plan", "target_plan"]

Encoding = Literal["linear", "sincos", "rereference", "onehot", "physical", "classes"]
"""What a band becomes: ``linear`` clip + standardise (one channel); ``sincos`` (sin, cos) of a phase (two);
``rereference`` a phase minus its per-chip median, over its std (one); ``onehot`` one channel per class code;
``physical`` (targets) stored × scale; ``classes`` (targets) class indices by a lookup table."""


_ZERO_STD_REPORTED: set[tuple[str, tuple[int, ...]]] = set()

@dataclass(frozen=True)
class BandPlan:
    """One selected stored band: where it is, what it is, and how it is normalised (physical units)."""

    index: int  # storage index in the modality
    name: str
    kind: str  # the band's kind in the registry
    scale: float  # physical per stored unit
    encoding: Encoding
    lo: float = -math.inf  # clip bounds; ±inf: none
    hi: float = math.inf
    mean: float = 0.0  # 0 / 1 where not standardised (sin/cos, one-hot)
    std: float = 1.0


@dataclass(frozen=True)
class RatioPlan:
    """One VV − VH channel (dB difference) of a pair of selected bands, standardised."""

    vv: int  # positions in the plan's bands
    vh: int
    mean: float
    std: float
    channel: str


def _tensor(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values))


@dataclass
class InputPlan:
    """How one input modality becomes standardised float channels: its band records, VV − VH channels, one-hot
    codes, what marks a stored value invalid, and its sizes. Output channel order: linear bands, (sin, cos) per
    ``sincos`` band, ``rereference`` bands, ratio channels; or the one-hot classes."""

    name: str
    modality: Modality
    band_plans: list[BandPlan]
    ratios: list[RatioPlan] = field(default_factory=list)
    onehot_codes: list[int] = field(default_factory=list)
    invalid_values: list[float] = field(default_factory=list)
    in_px: int = 0
    out_px: int = 0
    noise: float = 1.0  # factor on the noise std of this input
    can_be_invalid: bool = True  # nodata/special values or a float dtype
    channels: list[str] = field(init=False)
    out_mean: torch.Tensor = field(init=False)  # (C',) for denormalize; 0 where not standardised
    out_std: torch.Tensor = field(init=False)  # (C',) 1 where not standardised

    def __post_init__(self) -> None:
        bp = self.band_plans
        if self.onehot_codes:
            self.channels = list(self.modality.class_names) or [str(c) for c in self.onehot_codes]
            means, stds = [0.0] * len(self.onehot_codes), [1.0] * len(self.onehot_codes)
        else:
            lin = [bp[j] for j in self.linear]
            self.channels = [b.name for b in lin]
            means, stds = [b.mean for b in lin], [b.std for b in lin]
            for j in self.phase_sincos:
                self.channels += [f"{bp[j].name}_sin", f"{bp[j].name}_cos"]
                means += [0.0, 0.0]
                stds += [1.0, 1.0]
            for j in self.phase_reref:
                self.channels.append(f"{bp[j].name}_reref")
                means.append(0.0)
                stds.append(bp[j].std)
            self.channels += [r.channel for r in self.ratios]
            means += [r.mean for r in self.ratios]
            stds += [r.std for r in self.ratios]
        self.out_mean, self.out_std = _tensor(means), _tensor(stds)

    def _positions(self, encoding: Encoding) -> list[int]:
        return [j for j, b in enumerate(self.band_plans) if b.encoding == encoding]

    @property
    def bands(self) -> list[int]:
        """Selected storage indices."""
        return [b.index for b in self.band_plans]

    @property
    def linear(self) -> list[int]:
        """Positions (in :attr:`bands`) standardised linearly and kept as channels."""
        return self._positions("linear")

    @property
    def phase_sincos(self) -> list[int]:
        return self._positions("sincos")

    @property
    def phase_reref(self) -> list[int]:
        return self._positions("rereference")

    @property
    def ratio_pairs(self) -> list[tuple[int, int]]:
        """(VV, VH) positions in :attr:`bands` of the ratio channels."""
        return [(r.vv, r.vh) for r in self.ratios]

    @property
    def scale(self) -> torch.Tensor:
        """(C,) physical per stored unit."""
        return _tensor([b.scale for b in self.band_plans])

    @property
    def lo(self) -> torch.Tensor:
        """(C,) physical clip bounds (±inf = none)."""
        return _tensor([b.lo for b in self.band_plans])

    @property
    def hi(self) -> torch.Tensor:
        return _tensor([b.hi for b in self.band_plans])

    @property
    def mean(self) -> torch.Tensor:
        """(C,) physical; phase/one-hot bands 0."""
        return _tensor([b.mean for b in self.band_plans])

    @property
    def std(self) -> torch.Tensor:
        """(C,) physical; phase/one-hot bands 1."""
        return _tensor([b.std for b in self.band_plans])


@dataclass
class TargetPlan:
    """How one target modality becomes physical values (continuous) or class indices (categorical)."""

    name: str
    modality: Modality
    band_plans: list[BandPlan]
    categorical: bool
    lut: torch.Tensor | None = None  # code + lut_offset → class index or ignore
    lut_offset: int = 0
    codes: list[int] = field(default_factory=list)
    invalid_values: list[float] = field(default_factory=list)
    in_px: int = 0
    out_px: int = 0

    @property
    def bands(self) -> list[int]:
        """Selected storage indices."""
        return [b.index for b in self.band_plans]

    @property
    def scale(self) -> torch.Tensor | None:
        """(C,) physical per stored unit of a continuous target; None for a categorical one."""
        return None if self.categorical else _tensor([b.scale for b in self.band_plans])


# ---------------------------------------------------------------------------------------------------------------
# band selection


def select_bands(m: Modality, patterns: Sequence[str] | str | None) -> list[int]:
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


def input_bands(cfg: Mapping[str, Any], m: Modality) -> list[int]:
    """Storage indices an input uses: ``modalities.<m>.bands``, by default every band but categorical flag bands
    inside a non-categorical modality (e.g. gssic ``geometry_lsmap``)."""
    patterns = overrides(cfg, m).get("bands")
    bands = select_bands(m, patterns)
    if patterns is None and m.kind != "categorical":
        bands = [i for i in bands if m.band_kinds[i] != "categorical"]  # flag layers are not standardised
    return bands


def target_bands(cfg: Mapping[str, Any], m: Modality) -> list[int]:
    """Storage indices a target uses: ``modalities.<m>.bands``, by default all."""
    return select_bands(m, overrides(cfg, m).get("bands"))


def bands_needed(config: Mapping[str, Any] | None, modalities: Mapping[str, Modality], *, inputs: Sequence[str],
                 targets: Sequence[str] = ()) -> dict[str, list[int]]:
    """Per modality of ``inputs`` + ``targets``, the storage indices (sorted) of the bands that the device transforms
    built from ``config`` read: the loader need not fetch any other band. The same selection the transforms' plans
    make (``modalities.<m>.bands`` patterns; by default all bands, for inputs without categorical flag bands)."""
    cfg = full_config(config)
    out = {n: input_bands(cfg, modalities[n]) for n in inputs}
    out.update({n: target_bands(cfg, modalities[n]) for n in targets})
    return out


# ---------------------------------------------------------------------------------------------------------------
# building plans


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
        return (stat(st, m, band, "", p0) * scale, stat(st, m, band, "", p1) * scale)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        lo, hi = (-math.inf if spec[0] is None else float(spec[0]), math.inf if spec[1] is None else float(spec[1]))
        return (lo, hi)
    raise ValueError(f"transforms: clip of modality {m.name!r} must be null, 'percentiles', [lo, hi] or "
                     f"{{band token or pattern: ...}}, got {spec!r}")


def _invalid_values(m: Modality, keep_special: bool) -> list[float]:
    vals = []
    nd = nodata_value(m.nodata)
    if nd is not None:
        vals.append(float(nd))
    if not keep_special:
        vals.extend(float(k) for k in m.special_values)
    return vals


def _ratio_channel(vv: str, vh: str) -> str:
    """Name of the VV − VH channel of a band pair: ``summer_vv_asc`` → ``summer_vv-vh_asc``."""
    return vv.replace("_vv", "_vv-vh") if "_vv" in vv else f"{vv}-{vh}"


def _band_plan(cfg: Mapping[str, Any], m: Modality, i: int, st, user_mean: float | None,
               user_std: float | None) -> BandPlan:
    """The record of stored band ``i`` of input ``m`` (not one-hot)."""
    b, k, scale = m.bands[i], m.band_kinds[i], float(m.scale[i])
    if k == "categorical":
        raise ValueError(f"transforms: band {b!r} of input {m.name!r} is categorical inside a "
                         f"{m.kind} modality; select it out with transforms.modalities.{m.name}.bands")
    s = settings(cfg, m, k)
    if k == "phase":
        mode = s.get("mode", "sincos")
        if mode == "sincos":
            return BandPlan(i, b, k, scale, "sincos")
        if mode != "rereference":
            raise ValueError(f"transforms: phase mode of {m.name!r} must be 'sincos' or 'rereference', "
                             f"got {mode!r}")
        std = user_std if user_std is not None else stat(st, m, b, "std") * scale
        return BandPlan(i, b, k, scale, "rereference", std=std)
    lo, hi = _clip_bounds(s.get("clip"), m, b, s, st, scale)
    if k == "coherence":
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    mean = user_mean if user_mean is not None else stat(st, m, b, "mean") * scale
    std = user_std if user_std is not None else stat(st, m, b, "std") * scale
    return BandPlan(i, b, k, scale, "linear", lo=lo, hi=hi, mean=mean, std=std)


def _ratios(cfg: Mapping[str, Any], m: Modality, plans: Sequence[BandPlan]) -> list[RatioPlan]:
    """The VV − VH channels of a ``sar_db`` input with ``ratio`` on: one per polarisation pair of the registry
    whose both bands are selected."""
    if m.kind != "sar_db" or not settings(cfg, m, "sar_db").get("ratio"):
        return []
    pairs = [(a, b) for a, b in polarisation_pairs(m, [p.name for p in plans]) if plans[a].kind == "sar_db"]
    if not pairs:
        raise ValueError(f"transforms: ratio requested for {m.name!r} but no selected band has both a VV and a VH "
                         f"version (polarisation_pairs of the modality: {list(m.polarisation_pairs or ())})")
    return [RatioPlan(a, b, plans[a].mean - plans[b].mean,
                      math.sqrt(plans[a].std ** 2 + plans[b].std ** 2),  # upper bound: VV and VH correlate
                      _ratio_channel(plans[a].name, plans[b].name)) for a, b in pairs]


def input_plan(cfg: Mapping[str, Any], m: Modality, stats: Mapping[str, Any], grid: int) -> InputPlan:
    """The plan of input ``m`` in full config ``cfg`` (statistics of ``stats_scope`` from ``stats``), onto a
    ``grid`` px training grid unless ``modalities.<m>.size`` says otherwise."""
    st = band_stats(stats, m, cfg.get("stats_scope", "global"))
    over = overrides(cfg, m)
    bands = input_bands(cfg, m)
    n = len(bands)
    bad = [m.bands[i] for i in bands if not float(m.scale[i]) > 0]
    if bad:
        raise ValueError(f"transforms: modality {m.name!r} has non-positive scale for bands {bad}")
    onehot: list[int] = []
    if m.kind == "categorical":
        if n != 1:
            raise ValueError(f"transforms: categorical input {m.name!r} needs exactly one selected band")
        onehot = list(m.class_codes)
    user_mean = _per_band(over.get("mean"), n, "mean", m.name)
    user_std = _per_band(over.get("std"), n, "std", m.name)
    if onehot:
        plans = [BandPlan(i, m.bands[i], m.band_kinds[i], float(m.scale[i]), "onehot") for i in bands]
    else:
        plans = [_band_plan(cfg, m, i, st, user_mean[j] if user_mean else None, user_std[j] if user_std else None)
                 for j, i in enumerate(bands)]
    zero = [j for j, p in enumerate(plans) if not p.std > 0]
    if zero and (m.name, tuple(zero)) not in _ZERO_STD_REPORTED:  # once per process, not per transforms instance
        _ZERO_STD_REPORTED.add((m.name, tuple(zero)))
        log.warning("transforms: %r bands %s have std 0 (constant in stats.json); normalised with std 1", m.name,
                    [plans[j].name for j in zero])
    for j in zero:
        p = plans[j]
        plans[j] = BandPlan(p.index, p.name, p.kind, p.scale, p.encoding, p.lo, p.hi, p.mean, 1.0)
    keep_special = bool(settings(cfg, m, m.kind).get("keep_special", False))
    invalid = _invalid_values(m, keep_special)
    return InputPlan(
        name=m.name, modality=m, band_plans=plans, ratios=_ratios(cfg, m, plans), onehot_codes=onehot,
        invalid_values=invalid, in_px=m.canonical_px, out_px=int(over.get("size") or grid),
        noise=float(over.get("noise", 0.0 if onehot else 1.0)), can_be_invalid=bool(invalid) or m.np_dtype.kind == "f",
    )


def _lut(m: Modality, ignore: int) -> tuple[torch.Tensor | None, int]:
    """A code → class index table for 8/16-bit integer codes (index: code + offset); None for wider types."""
    dt = m.np_dtype
    if dt.kind not in "iu" or dt.itemsize > 2:
        return None, 0
    info = np.iinfo(dt)
    offset = -int(info.min)
    lut = torch.full((int(info.max) - int(info.min) + 1,), ignore, dtype=torch.long)
    for k, code in enumerate(m.class_codes):
        if info.min <= code <= info.max:
            lut[code + offset] = k
    nd = nodata_value(m.nodata)
    if nd is not None and info.min <= nd <= info.max:
        lut[int(nd) + offset] = ignore
    return lut, offset


def target_plan(cfg: Mapping[str, Any], m: Modality, grid: int) -> TargetPlan:
    """The plan of target ``m`` in full config ``cfg``: on the ``grid``, or its own coarser grid
    (``grid.coarse_targets: own``), or ``modalities.<m>.size``."""
    over = overrides(cfg, m)
    bands = target_bands(cfg, m)
    px = m.canonical_px
    if over.get("size"):
        out_px = int(over["size"])
    elif px < grid and cfg["grid"].get("coarse_targets", "own") == "own":
        out_px = px
    else:
        out_px = grid
    keep_special = bool(settings(cfg, m, m.kind).get("keep_special", False))
    enc: Encoding = "classes" if m.is_categorical else "physical"
    plans = [BandPlan(i, m.bands[i], m.band_kinds[i], float(m.scale[i]), enc) for i in bands]
    if m.is_categorical:
        if len(bands) != 1:
            raise ValueError(f"transforms: categorical target {m.name!r} needs exactly one selected band")
        lut, off = _lut(m, int(cfg["ignore_index"]))
        return TargetPlan(m.name, m, plans, True, lut=lut, lut_offset=off, codes=list(m.class_codes),
                          invalid_values=_invalid_values(m, True), in_px=px, out_px=out_px)
    return TargetPlan(m.name, m, plans, False, invalid_values=_invalid_values(m, keep_special), in_px=px,
                      out_px=out_px)
