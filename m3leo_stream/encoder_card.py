"""Encoders that carry their preprocessing: an encoder card, a safetensors export, and a pipeline check.

The card says what an encoder was trained on, in enough detail to feed it the same numbers again: the input
modalities in token order, per modality the stored bands in order with their units and scale, the channels the
device transforms make of them, the effective normalisation (clip bounds, mean, std per band, VV−VH pairs), the
chip size in and the grid size out, the encoder's patch size and token grid, the whole (merged) transforms config
and the statistics it used (the ``stats.json`` entries of the input modalities, plus their SHA-256).

:func:`export_encoder` writes ``encoder.pt`` (the :func:`m3leo_stream.models.save_encoder` format, with the card
under ``"card"``), ``encoder.safetensors`` (weights, with the encoder config and the card as JSON in the safetensors
metadata) and ``encoder.card.json`` next to them. :func:`load_encoder_and_card` reads any of them (or a pretraining
checkpoint, which has no card). :func:`check_pipeline` compares a card with the transforms a loader would use and
:func:`require_pipeline` refuses a mismatch; :func:`transforms_from_card` rebuilds the matching transforms from the
card alone (its config and its statistics) against a shard root's registry, and checks the result.

timm export: not provided. ``pip install timm`` resolves torchvision, which pins a newer torch (2.14 with CUDA
wheels) than the project's torch 2.13 CPU build, so timm cannot be installed next to it; see ``models/mae.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from m3leo_stream import shard_format as sf
from m3leo_stream.models.mae import MultiModalEncoder, load_encoder, save_encoder
from m3leo_stream.transforms import DeviceTransforms, build_device_transforms

log = logging.getLogger(__name__)

CARD_VERSION = 1
ENCODER_KIND = "m3leo_stream.MultiModalEncoder"


class PipelineMismatch(ValueError):
    """The input pipeline does not produce what the encoder was trained on (the message lists every difference)."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def _finite(values: Sequence[float]) -> list[float | None]:
    """JSON-safe floats: ±inf (no clip bound) becomes None."""
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def stats_hash(stats: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a statistics subset."""
    return hashlib.sha256(_canonical(stats).encode()).hexdigest()


def pipeline_of(transforms: DeviceTransforms) -> dict[str, dict[str, Any]]:
    """Per input modality, what the transforms make of its stored bands: band names, units and scale, output
    channels, clip bounds, mean and std (physical units), VV−VH pairs, phase handling, chip and grid size."""
    out: dict[str, dict[str, Any]] = {}
    for name, p in transforms.inputs.items():
        m = p.modality
        out[name] = {
            "bands": [m.bands[i] for i in p.bands],
            "units": [m.units[i] if i < len(m.units) else "" for i in p.bands],
            "scale": [float(s) for s in p.scale.tolist()],
            "channels": list(p.channels),
            "clip_lo": _finite(p.lo.tolist()),
            "clip_hi": _finite(p.hi.tolist()),
            "mean": [float(v) for v in p.mean.tolist()],
            "std": [float(v) for v in p.std.tolist()],
            "ratio_pairs": [[int(a), int(b)] for a, b in p.ratio_pairs],
            "phase_sincos": list(p.phase_sincos),
            "phase_rereference": list(p.phase_reref),
            "onehot_codes": list(p.onehot_codes),
            "in_px": int(p.in_px),
            "out_px": int(p.out_px),
        }
    return out


def build_card(encoder: MultiModalEncoder, transforms: DeviceTransforms, stats: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card of ``encoder`` trained with (the evaluation version of) ``transforms`` and ``stats``."""
    mods = list(encoder.modalities)
    missing = [m for m in mods if m not in transforms.inputs]
    if missing:
        raise ValueError(f"encoder modalities {missing} are not inputs of the transforms ({list(transforms.inputs)})")
    sub = sf.Stats.of(stats).subset(mods)  # what the transforms of those inputs read
    cfg = dict(transforms.config)
    card = {
        "card_version": CARD_VERSION,
        "kind": ENCODER_KIND,
        "encoder": dict(encoder.config),
        "modalities": mods,
        "patch_size": int(encoder.patch_size),
        "grid": int(transforms.grid),
        "token_grid": int(transforms.grid) // int(encoder.patch_size),
        "inputs": {m: v for m, v in pipeline_of(transforms).items() if m in mods},
        "transforms": json.loads(_canonical(cfg)),
        "stats_scope": cfg.get("stats_scope", "global"),
        "stats": json.loads(_canonical(sub)),
        "stats_hash": stats_hash(sub),
        **dict(extra or {}),
    }
    for m in mods:
        want = int(encoder.config["in_channels"][m])
        have = len(card["inputs"][m]["channels"])
        if want != have:
            raise ValueError(f"encoder expects {want} channels of {m!r}, the transforms make {have}")
    return card


def _close(a: Any, b: Any, rtol: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-9)
    return a == b


def check_pipeline(card: Mapping[str, Any], transforms: DeviceTransforms, rtol: float = 1e-5) -> list[str]:
    """Every difference between what the card's encoder was trained on and what ``transforms`` produce (empty when
    they match): modalities, per-modality bands/units/scale/channels/normalisation/sizes, the grid and whether the
    grid is divisible by the patch size. Statistics that differ only where nothing uses them are not a difference."""
    problems: list[str] = []
    have = pipeline_of(transforms)
    for m in card["modalities"]:
        if m not in have:
            problems.append(f"{m}: the encoder needs this input; the pipeline has {sorted(have)}")
            continue
        want = card["inputs"][m]
        for key, value in want.items():
            if key not in have[m]:
                continue
            if not _close(value, have[m][key], rtol):
                problems.append(f"{m}.{key}: encoder trained with {value}, pipeline gives {have[m][key]}")
    if int(transforms.grid) != int(card["grid"]):
        problems.append(f"grid: encoder trained on {card['grid']} px, pipeline gives {transforms.grid} px")
    if int(transforms.grid) % int(card["patch_size"]):
        problems.append(f"grid {transforms.grid} px is not divisible by the patch size {card['patch_size']}")
    return problems


def require_pipeline(card: Mapping[str, Any], transforms: DeviceTransforms, stats: Mapping[str, Any] | None = None,
                     rtol: float = 1e-5) -> None:
    """Refuse (:class:`PipelineMismatch`) transforms that do not feed the encoder what it was trained on; warn when
    only the statistics' hash differs (the effective normalisation still matches)."""
    problems = check_pipeline(card, transforms, rtol)
    if problems:
        raise PipelineMismatch("input pipeline does not match the encoder card:\n  " + "\n  ".join(problems)
                               + "\n(rebuild the transforms from the card: transforms_from_card, or embed's "
                                 "transforms_from=card)")
    if stats is not None and card.get("stats_hash"):
        h = stats_hash(sf.Stats.of(stats).subset(card["modalities"]))
        if h != card["stats_hash"]:
            log.warning("statistics differ from the encoder card's (hash %s… vs %s…) where the inputs do not use "
                        "them; the normalisation matches", h[:12], card["stats_hash"][:12])


def transforms_from_card(card: Mapping[str, Any], modalities: Mapping[str, Any], *, train: bool = False,
                         seed: int = 0, rank: int = 0) -> DeviceTransforms:
    """The transforms the card's encoder was trained with (evaluation version by default), rebuilt from the card's
    config and statistics against ``modalities`` (a shard root's registry), checked against the card."""
    t = build_device_transforms(card["transforms"], modalities, card["stats"], inputs=list(card["modalities"]),
                                targets=[], train=train, seed=seed, rank=rank)
    problems = check_pipeline(card, t)
    if problems:
        raise PipelineMismatch("this shard root's registry cannot reproduce the encoder card's pipeline:\n  "
                               + "\n  ".join(problems))
    return t


# --- files ---------------------------------------------------------------------------------------------------------

def _write_bytes(url: str, data: bytes) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _read_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def _stem(url: str) -> str:
    for ext in (".safetensors", ".pt", ".ckpt", ".card.json"):
        if url.endswith(ext):
            return url[: -len(ext)]
    return url


def save_safetensors(encoder: MultiModalEncoder, url: str, card: Mapping[str, Any] | None = None) -> None:
    """Weights as safetensors; the encoder config and the card travel in the file's metadata (JSON strings)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"kind": ENCODER_KIND, "config": _canonical(encoder.config)}
    if card is not None:
        meta["card"] = _canonical(card)
    _write_bytes(url, save(state, metadata=meta))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    from safetensors import safe_open

    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        f.write(data)
        name = f.name
    try:
        with safe_open(name, framework="pt") as st:
            return dict(st.metadata() or {})
    finally:
        os.unlink(name)


def load_safetensors(url: str, map_location: str | torch.device = "cpu") -> tuple[MultiModalEncoder,
                                                                                   dict[str, Any] | None]:
    """An encoder written by :func:`save_safetensors` and its card (None when the file has none)."""
    from safetensors.torch import load

    data = _read_bytes(url)
    meta = _safetensors_metadata(data)
    if meta.get("kind") != ENCODER_KIND or "config" not in meta:
        raise ValueError(f"{url}: not an m3leo_stream encoder (safetensors metadata kind {meta.get('kind')!r})")
    enc = MultiModalEncoder(**json.loads(meta["config"]))
    enc.load_state_dict(load(data), strict=True)
    enc.to(map_location)
    return enc, (json.loads(meta["card"]) if "card" in meta else None)


def export_encoder(encoder: MultiModalEncoder, url: str, transforms: DeviceTransforms, stats: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``<stem>.pt`` (save_encoder format + ``card``), ``<stem>.safetensors`` and ``<stem>.card.json`` for
    ``url`` = ``<stem>.pt``; returns the card."""
    card = build_card(encoder, transforms, stats, {k: v for k, v in (extra or {}).items() if k == "run_id"})
    save_encoder(encoder, url, {**dict(extra or {}), "card": card})
    stem = _stem(url)
    save_safetensors(encoder, stem + ".safetensors", card)
    _write_bytes(stem + ".card.json", (json.dumps(card, indent=1, sort_keys=True) + "\n").encode())
    log.info("encoder with its card written: %s(.pt|.safetensors|.card.json)", stem)
    return card


def load_encoder_and_card(url: str, map_location: str | torch.device = "cpu") -> tuple[MultiModalEncoder,
                                                                                       dict[str, Any] | None]:
    """Encoder and card from ``encoder.safetensors``, ``encoder.pt`` (card inside, or a ``.card.json`` beside it)
    or a pretraining checkpoint (no card unless a ``.card.json`` sits beside it)."""
    if url.endswith(".safetensors"):
        return load_safetensors(url, map_location)
    enc = load_encoder(url, map_location)
    card = None
    try:
        obj = torch.load(io.BytesIO(_read_bytes(url)), map_location="cpu", weights_only=False)
        card = obj.get("card") if isinstance(obj, Mapping) else None
    except (OSError, RuntimeError):  # pragma: no cover - load_encoder read it just before
        card = None
    if card is None:
        side = _stem(url) + ".card.json"
        try:
            card = json.loads(_read_bytes(side))
        except (FileNotFoundError, OSError):
            card = None
    return enc, card
