"""The composed device transforms of one split: band plans → normalisation → geometry → augmentations."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from m3leo_stream.modalities import BANDS_KEY, Modality

from .bands import input_plan, target_plan
from .defaults import full_config
from .geometry import dihedral, theta, warp
from .normalise import Normaliser
from .params import dropout_on_device, make_generator, sample_params, to_device

log = logging.getLogger(__name__)

__all__ = ["DeviceTransforms", "build_device_transforms"]


class DeviceTransforms:
    """The transform pipeline for one split (train or eval); see :mod:`m3leo_stream.transforms` and README
    ``## Device transforms``. Call as ``t(batch, step=global_step)``."""

    def __init__(self, config: Mapping[str, Any], modalities: Mapping[str, Modality], stats: Mapping[str, Any],
                 *, inputs: Sequence[str], targets: Sequence[str], train: bool, seed: int = 0, rank: int = 0):
        cfg = full_config(config)
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
        in_mods = [modalities[n] for n in inputs]
        tg_mods = [modalities[n] for n in targets]
        grid = cfg["grid"].get("size") or max([m.canonical_px for m in in_mods] or
                                              [m.canonical_px for m in tg_mods] or [1])
        self.grid = int(grid)
        self.inputs = {m.name: input_plan(cfg, m, stats, self.grid) for m in in_mods}
        self.targets = {m.name: target_plan(cfg, m, self.grid) for m in tg_mods}
        self.normaliser = Normaliser(self.inputs, self.targets, ignore_index=self.ignore_index,
                                     valid_reduce=cfg.get("valid_reduce", "all"))
        self.channels: dict[str, list[str]] = {n: list(p.channels) for n, p in self.inputs.items()}
        self.num_classes: dict[str, int] = {n: len(p.codes) for n, p in self.targets.items() if p.categorical}
        self.class_names: dict[str, list[str]] = {
            n: list(p.modality.class_names) or [str(c) for c in p.codes]
            for n, p in self.targets.items() if p.categorical
        }
        self.out_px: dict[str, int] = {**{n: p.out_px for n, p in self.inputs.items()},
                                       **{n: p.out_px for n, p in self.targets.items()}}
        self._calls = 0

    def __repr__(self) -> str:
        return (f"DeviceTransforms(train={self.train}, grid={self.grid}, inputs={list(self.inputs)}, "
                f"targets={list(self.targets)}, rank={self.rank})")

    # -- random parameters -------------------------------------------------------------------------------------

    def generator(self, step: int, stream: str = "params", device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from (seed, rank, step, stream): reproducible, different across ranks."""
        return make_generator(self.seed, self.rank, step, stream, device)

    def sample_params(self, batch_size: int, step: int) -> dict[str, Any]:
        """The per-sample augmentation parameters of one step (all on the CPU); see :mod:`.params`."""
        return sample_params(self.aug, self.generator(step), batch_size, self.inputs)

    theta = staticmethod(theta)

    # -- normalisation (see :class:`.normalise.Normaliser`) ----------------------------------------------------

    def normalize_input(self, name: str, x_stored: torch.Tensor,
                        bands: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (B, C, H, W) of input ``name`` → (standardised channels, valid (B, 1, H, W)). ``x_stored`` holds
        all bands of the modality, or those ``bands`` names (storage order, at least the ones these transforms use):
        the result is the same."""
        y, valid, _ = self.normaliser.input_channels(name, x_stored, bands)
        return y, valid

    def normalize_input_channels(self, name: str, x_stored: torch.Tensor, bands: Sequence[str] | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`normalize_input` plus (B, C') bool per output channel: False where a band it derives from is
        missing in the chip (all nodata), ``None`` when no band can be. Missing bands are 0 in the output."""
        return self.normaliser.input_channels(name, x_stored, bands)

    def prepare_target(self, name: str, x_stored: torch.Tensor,
                       bands: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored target (all bands, or those ``bands`` names) → (int64 (B, H, W) classes | float32 (B, C, H, W)
        physical, valid (B, 1, H, W))."""
        y, valid, _ = self.normaliser.target_channels(name, x_stored, bands)
        return y, valid

    def prepare_target_channels(self, name: str, x_stored: torch.Tensor, bands: Sequence[str] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`prepare_target` plus (B, C) bool per band of a continuous target: False where the chip lacks the
        band (all nodata); ``None`` for categorical targets or when no band can be missing."""
        return self.normaliser.target_channels(name, x_stored, bands)

    def denormalize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of the input standardisation: channels of ``name`` back in physical units (sin/cos and one-hot
        channels unchanged). Accepts (B, C, H, W) or (C, H, W)."""
        return self.normaliser.denormalize(name, tensor)

    # -- augmentations applied to one input's standardised channels -------------------------------------------

    def _add_noise(self, name: str, y: torch.Tensor, valid: torch.Tensor, params: Mapping[str, Any],
                   gen: torch.Generator) -> None:
        """Per-band Gaussian noise (std drawn per sample and channel) added in place to the noisy samples; invalid
        pixels stay 0. ``gen`` draws the fields on the device, one stream for every input of the step."""
        idx = torch.nonzero(params["noisy"]).flatten()
        dev = y.device
        sd = to_device(params["noise_std"][name][idx], dev).view(len(idx), -1, 1, 1)
        di = to_device(idx, dev)
        noise = torch.randn((len(idx), *y.shape[1:]), generator=gen, device=dev, dtype=y.dtype)
        noise.mul_(sd)
        if self.inputs[name].can_be_invalid:
            noise.mul_(valid.index_select(0, di))
        y.index_add_(0, di, noise)

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
        th = theta(params["box"], d)
        any_crop = bool(params["crop"].any())
        dev = first.device

        def geom(x: torch.Tensor, in_px: int, out_px: int, mode: Literal["bilinear", "nearest"]) -> torch.Tensor:
            if any_crop or in_px != out_px or x.shape[-1] != out_px:
                return warp(x, th, out_px, mode)
            return dihedral(x, d)

        def geom_mask(v: torch.Tensor, in_px: int, out_px: int) -> torch.Tensor:
            if any_crop or v.shape[-1] != out_px:
                return warp(v.float(), th, out_px, "nearest") > 0.5
            return dihedral(v, d)

        # samples lacking an optional member (``<mod>_present`` False, from the loader): zeros, nothing valid
        present = {n: batch[f"{n}_present"].to(dev).bool().view(-1) for n in names if f"{n}_present" in batch}
        drop_dev = dropout_on_device(params["drop"], present, dev) if self.train else {}
        noise_gen = None
        for name, p in self.inputs.items():
            if name not in batch:
                raise KeyError(f"transforms: batch has no input {name!r} (keys: {', '.join(map(str, batch))})")
            y, valid, chan_valid = self.normaliser.input_channels(name, batch[name], carried.get(name))
            warped = any_crop or y.shape[-1] != p.out_px
            y = geom(y, y.shape[-1], p.out_px, "bilinear")
            valid = geom_mask(valid, valid.shape[-1], p.out_px)
            if warped and p.can_be_invalid:
                y.mul_(valid)  # resampling next to invalid pixels must not leak; invalid stays 0 (the mean)
            if params["noise_any"]:
                if noise_gen is None:
                    noise_gen = self.generator(step, "noise", dev)
                self._add_noise(name, y, valid, params, noise_gen)
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
        for name, tp in self.targets.items():
            if name not in batch:
                raise KeyError(f"transforms: batch has no target {name!r} (keys: {', '.join(map(str, batch))})")
            y, valid, chan = self.normaliser.target_channels(name, batch[name], carried.get(name))
            if not tp.categorical:  # which target bands the chip has (a missing one is never scored)
                out[f"{name}_channel_valid"] = chan if chan is not None else \
                    torch.ones(bsz, y.shape[1], dtype=torch.bool, device=dev)
            if name in present:
                pr = present[name]
                out[f"{name}_present"] = pr
                if tp.categorical:
                    y = y.masked_fill(~pr.view(-1, 1, 1), self.ignore_index)
                else:
                    y = y * pr.view(-1, 1, 1, 1)
                    valid = valid & pr.view(-1, 1, 1, 1)
                    out[f"{name}_channel_valid"] = out[f"{name}_channel_valid"] & pr.view(-1, 1)
            if tp.categorical:
                if any_crop or y.shape[-1] != tp.out_px:
                    # class indices and -100 are exact in float32; nearest never mixes them
                    y = warp(y.unsqueeze(1).float(), th, tp.out_px, "nearest").squeeze(1).round().long()
                else:
                    y = dihedral(y, d)
                valid = (y != self.ignore_index).unsqueeze(1)
            else:
                y = geom(y, y.shape[-1], tp.out_px, "bilinear")
                valid = geom_mask(valid, valid.shape[-1], tp.out_px)
                y = y * valid
            out[name] = y
            out[f"{name}_valid"] = valid
        return out


def build_device_transforms(config: Mapping[str, Any] | None, modalities: Mapping[str, Modality],
                            stats: Mapping[str, Any], *, inputs: Sequence[str], targets: Sequence[str], train: bool,
                            seed: int = 0, rank: int = 0) -> DeviceTransforms:
    """The device transforms for ``inputs``/``targets`` (see :class:`DeviceTransforms`).

    ``config`` is a Mapping or DictConfig (``configs/transforms/*.yaml``), merged over
    :data:`~m3leo_stream.transforms.defaults.DEFAULT_CONFIG`; ``modalities`` the registry of the shard root;
    ``stats`` the parsed ``stats.json``.
    """
    return DeviceTransforms(config or {}, modalities, stats, inputs=inputs, targets=targets, train=train,
                            seed=seed, rank=rank)
