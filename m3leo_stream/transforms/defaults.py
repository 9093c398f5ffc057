"""The transforms config: its defaults (``m3leo_stream/configs/transforms/default.yaml`` holds the same values)
and how a user config is merged over them and read per modality and band kind."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from m3leo_stream.modalities import Modality

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
"""Every key the transforms read, with its default; ``train``/``eval`` hold one entry per augmentation."""

KIND_KEYS = ("sar_db", "optical", "coherence", "continuous", "phase", "categorical")


def plain(cfg: Any) -> Any:
    """A DictConfig/Mapping/sequence tree as plain dicts and lists."""
    try:  # omegaconf is a dependency, but keep plain Mappings working without it
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {str(k): plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain(v) for v in cfg]
    return cfg


def full_config(config: Any) -> dict[str, Any]:
    """A transforms config (Mapping, DictConfig or None) merged over :data:`DEFAULT_CONFIG`."""
    return merge(DEFAULT_CONFIG, plain(config) or {})


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, nested mappings key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def settings(cfg: Mapping[str, Any], m: Modality, kind: str) -> dict[str, Any]:
    """Settings of the bands of ``kind`` in modality ``m``: kind defaults < modality overrides < modality.kind."""
    over = dict(cfg["modalities"].get(m.name) or {})
    nested = {k: over.pop(k) for k in list(over) if k in KIND_KEYS and isinstance(over[k], Mapping)}
    s = merge(cfg["kinds"].get(kind, {}), over)
    return merge(s, nested.get(kind, {}))


def overrides(cfg: Mapping[str, Any], m: Modality) -> dict[str, Any]:
    """The ``modalities.<m>`` overrides of a full config (empty when none)."""
    return cfg["modalities"].get(m.name) or {}
