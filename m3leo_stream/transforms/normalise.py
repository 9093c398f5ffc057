"""Applying band plans to stored tensors: standardised input channels, physical or class-index targets, validity
masks (nodata, NaN, bands a chip lacks), and the inverse for display. Runs on the tensors' device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from m3leo_stream.modalities import BANDS_KEY, Modality

from .bands import InputPlan, TargetPlan
from .params import to_device

__all__ = ["Normaliser"]


class Normaliser:
    """The plans of one pipeline's inputs and targets, with their constants cached per device."""

    def __init__(self, inputs: Mapping[str, InputPlan], targets: Mapping[str, TargetPlan], *, ignore_index: int,
                 valid_reduce: Literal["all", "any"] = "all"):
        self.inputs = dict(inputs)
        self.targets = dict(targets)
        self.ignore_index = int(ignore_index)
        self.valid_reduce = valid_reduce
        self._dev: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._positions: dict[tuple[str, tuple[int, ...], str], torch.Tensor] = {}

    def _buffers(self, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        key = (name, str(device))
        if key not in self._dev:
            self._dev[key] = (self._input_buffers(self.inputs[name], device) if name in self.inputs else
                              self._target_buffers(self.targets[name], device))
        return self._dev[key]

    @staticmethod
    def _input_buffers(p: InputPlan, device: torch.device) -> dict[str, torch.Tensor]:
        v = lambda t: t.to(device, torch.float32).view(1, -1, 1, 1)  # noqa: E731
        scale, lo, hi, mean, std = p.scale, p.lo, p.hi, p.mean, p.std
        # standardise stored values in one fused step: clamp(x*scale, lo, hi) → (x*scale − mean)/std
        # (clip bounds are converted to stored units; scales are positive)
        d = {
            "lo": v(lo / scale), "hi": v(hi / scale), "a": v(scale / std), "b": v(-mean / std),
            "scale": v(scale),
            "linear": torch.tensor(p.linear, device=device, dtype=torch.long),
            "out_mean": v(p.out_mean), "out_std": v(p.out_std),
        }
        if p.ratios:
            d["ratio_a"] = torch.tensor([i for i, _ in p.ratio_pairs], device=device)
            d["ratio_b"] = torch.tensor([j for _, j in p.ratio_pairs], device=device)
            d["ratio_mean"] = v(torch.tensor([r.mean for r in p.ratios]))
            d["ratio_std"] = v(torch.tensor([r.std for r in p.ratios]))
        return d

    @staticmethod
    def _target_buffers(p: TargetPlan, device: torch.device) -> dict[str, torch.Tensor]:
        d: dict[str, torch.Tensor] = {}
        if p.lut is not None:
            d["lut"] = p.lut.to(device)
        if p.codes:
            d["codes"] = torch.tensor(p.codes, device=device)
        if p.scale is not None:
            d["scale"] = p.scale.to(device).view(1, -1, 1, 1)
        return d

    @staticmethod
    def _band_valid(x: torch.Tensor, invalid_values: Sequence[float]) -> torch.Tensor | None:
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
        if self.valid_reduce == "any":
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

    def input_channels(self, name: str, x_stored: torch.Tensor, bands: Sequence[str] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stored (B, C, H, W) of input ``name`` (all bands, or those ``bands`` names) → (standardised channels,
        valid (B, 1, H, W), (B, C') bool per output channel: False where a band it derives from is missing in the
        chip, ``None`` when no band can be). Missing bands are 0 in the output."""
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
        sincos, reref, linear = p.phase_sincos, p.phase_reref, p.linear
        # phase bands: the float32 scale and std, as the kernels use them
        scale, std = (p.scale.tolist(), p.std.tolist()) if sincos or reref else ([], [])
        heads = {j: xf[:, j:j + 1] * float(scale[j]) for j in sincos + reref}  # phase, before standardisation
        clipped = torch.clamp_(xf, buf["lo"], buf["hi"])
        ratio = None
        if p.ratios:
            a, b = buf["ratio_a"], buf["ratio_b"]
            sa, sb = buf["scale"].index_select(1, a), buf["scale"].index_select(1, b)
            ratio = (clipped.index_select(1, a) * sa - clipped.index_select(1, b) * sb - buf["ratio_mean"])
            ratio /= buf["ratio_std"]
            if band_valid is not None:
                ratio.masked_fill_(~(band_valid.index_select(1, a) & band_valid.index_select(1, b)), 0.0)
        z = clipped.mul_(buf["a"]).add_(buf["b"])
        if band_valid is not None:
            z.masked_fill_(~band_valid, 0.0)
        parts.append(z if len(linear) == z.shape[1] else z.index_select(1, buf["linear"]))
        for j in sincos:
            ph = heads[j]
            s, c = torch.sin(ph), torch.cos(ph)
            if band_valid is not None:
                s, c = s.masked_fill(~band_valid[:, j:j + 1], 0.0), c.masked_fill(~band_valid[:, j:j + 1], 0.0)
            parts += [s, c]
        for j in reref:
            ph = heads[j]
            ok = band_valid[:, j:j + 1] if band_valid is not None else torch.ones_like(ph, dtype=torch.bool)
            ref = torch.nanmedian(torch.where(ok, ph, torch.nan).flatten(1), dim=1).values
            ref = torch.nan_to_num(ref, nan=0.0).view(-1, 1, 1, 1)  # all-invalid chips: nothing to reference
            parts.append(((ph - ref) / float(std[j])).masked_fill(~ok, 0.0))
        if ratio is not None:
            parts.append(ratio)
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if present is None:
            return y, valid, None
        chans = [present if len(linear) == present.shape[1] else present.index_select(1, buf["linear"])]
        for j in sincos:
            chans += [present[:, j:j + 1]] * 2
        for j in reref:
            chans.append(present[:, j:j + 1])
        if p.ratios:
            chans.append(present.index_select(1, buf["ratio_a"]) & present.index_select(1, buf["ratio_b"]))
        return y, valid, chans[0] if len(chans) == 1 else torch.cat(chans, 1)

    def target_channels(self, name: str, x_stored: torch.Tensor, bands: Sequence[str] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stored target (all bands, or those ``bands`` names) → (int64 (B, H, W) classes | float32 (B, C, H, W)
        physical, valid (B, 1, H, W), (B, C) bool per band of a continuous target: False where the chip lacks the
        band; ``None`` for categorical targets or when no band can be missing)."""
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
