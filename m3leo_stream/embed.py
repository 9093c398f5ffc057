"""Embedding export: ``python -m m3leo_stream.embed encoder=<encoder> data.root=<shards> [hydra overrides]``.

An encoder (``encoder.safetensors``, ``encoder.pt`` or a pretraining checkpoint; path or fsspec URL) runs over the
chips of a shard root's splits, streamed by the DataModule's evaluation loaders (every chip of a split once, in
index order; the padding of the last global batch is dropped). One embedding per chip, the encoder's tokens pooled
(``pooling``), is written as Parquet (``<out>/embeddings.parquet``) beside ``key``, ``region``, ``split``, ``lon``,
``lat``, the inputs' ``<mod>_present`` flags, the chip's land-cover composition from ``esawc`` when the root has it
(``lc_<class>`` area fractions of the valid pixels, NaN when the chip lacks it) and terrain summaries from
``srtmdem`` when present (``elev_mean``, ``elev_std`` in m, ``slope_mean`` in degrees). Both are read raw (stored
codes and values × registry scale), not through the device transforms.

Tokens of inputs a chip lacks (``<mod>_present`` False) are left out of attention (key padding mask) and of the
pooling, so such a chip is embedded from what it has.

Preprocessing: with an encoder card (``encoder_card``) the inputs' transforms are rebuilt from the card
(``transforms_from=card``, default) or taken from ``transforms`` and checked against the card
(``transforms_from=config``: a mismatch is refused). Without a card, ``transforms`` is used unchecked (a warning).

Distributed: launched with ``torchrun --nproc-per-node N -m m3leo_stream.embed ...`` (or any launcher that sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``) each rank embeds its part of every
global batch; rank 0 merges and checks that each chip of each split is there exactly once.

Resumable: each rank writes its rows every ``part_batches`` batches to ``<out>/parts/<split>/`` (written whole,
then renamed); a rerun (``resume=true``) with the same encoder, pooling, splits, world size and batch size starts
each rank after its last complete part. Configs: ``m3leo_stream/configs/embed.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from m3leo_stream.config import plain, register
from m3leo_stream.configs import CONFIG_DIR
from m3leo_stream.modalities import BANDS_KEY, Modality
from m3leo_stream.models.mae import MultiModalEncoder
from m3leo_stream.shard_format import SPLITS, Split

log = logging.getLogger("m3leo_stream.embed")

register()  # the schemas the config groups extend (m3leo_stream.config)
Pooling = Literal["mean", "max", "mean_max", "modality_mean"]
TransformsFrom = Literal["card", "config"]
LC_PREFIX = "lc_"
TERRAIN_COLUMNS = ("elev_mean", "elev_std", "slope_mean")
OUTPUT = "embeddings.parquet"
META = "embeddings.json"
FINGERPRINT = "fingerprint.json"
_PART = re.compile(r"r(\d+)of(\d+)-b(\d+)-(\d+)\.parquet$")


# --- pooling -----------------------------------------------------------------------------------------------------

def pooled_dim(encoder: MultiModalEncoder, pooling: Pooling) -> int:
    """Length of one embedding."""
    return {"mean": 1, "max": 1, "mean_max": 2, "modality_mean": len(encoder.modalities)}[pooling] * encoder.dim


@torch.no_grad()
def embed_batch(encoder: MultiModalEncoder, batch: Mapping[str, Any], pooling: Pooling = "mean") -> torch.Tensor:
    """(B, pooled_dim) embeddings of a transformed batch.

    ``mean``/``max``: mean/max over all tokens of the present inputs; ``mean_max``: both, concatenated;
    ``modality_mean``: the mean of each input's tokens, concatenated in the encoder's modality order (zeros for an
    input the chip lacks). Absent inputs' tokens are masked out of attention as well."""
    if pooling not in get_args(Pooling):
        raise ValueError(f"pooling must be one of {get_args(Pooling)}, not {pooling!r}")
    tokens, mods, grid = encoder.tokenize(batch)
    b, _, d = tokens.shape
    n = grid * grid
    present = torch.stack([batch[f"{m}_present"].to(tokens.device).bool().view(-1) if f"{m}_present" in batch
                           else torch.ones(b, dtype=torch.bool, device=tokens.device) for m in mods], 1)  # (B, M)
    if not present.any(1).all():
        raise ValueError("a chip has none of the encoder's inputs present (min_inputs_present must be >= 1)")
    pad = (~present).repeat_interleave(n, 1)  # (B, M·N), True = left out
    z = tokens
    mask = pad if pad.any() else None
    for blk in encoder.blocks:
        z = blk(z, src_key_padding_mask=mask)
    z = encoder.norm(z).float()
    keep = (~pad).unsqueeze(-1).float()
    if pooling == "modality_mean":
        zm = z.view(b, len(mods), n, d).mean(2) * present.unsqueeze(-1).float()
        full = torch.zeros(b, len(encoder.modalities), d, device=z.device)
        for i, m in enumerate(mods):
            full[:, encoder.modalities.index(m)] = zm[:, i]
        return full.reshape(b, -1)
    mean = (z * keep).sum(1) / keep.sum(1).clamp(min=1.0)
    if pooling == "mean":
        return mean
    mx = z.masked_fill(pad.unsqueeze(-1), float("-inf")).amax(1)
    return mx if pooling == "max" else torch.cat([mean, mx], 1)


# --- per-chip covariates -------------------------------------------------------------------------------------------

def land_cover_columns(m: Modality) -> list[str]:
    """``lc_<class name>`` column names (lowercase, non-alphanumerics as _), in class-code order."""
    names = list(m.class_names) or [str(c) for c in m.class_codes]
    return [LC_PREFIX + re.sub(r"[^a-z0-9]+", "_", n.lower()).strip("_") for n in names]


def land_cover_fractions(codes: torch.Tensor, m: Modality) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) area fractions of each class among the chip's valid pixels (NaN where none is valid) and (B,) the
    valid share of the chip, from stored class codes (B, 1, H, W)."""
    x = codes[:, 0].reshape(codes.shape[0], -1).long()
    counts = torch.stack([(x == int(c)).sum(1) for c in m.class_codes], 1).double()
    total = counts.sum(1, keepdim=True)
    frac = torch.where(total > 0, counts / total.clamp(min=1), torch.full_like(counts, float("nan")))
    return frac.numpy().astype(np.float32), (total[:, 0] / x.shape[1]).numpy().astype(np.float32)


def terrain_summary(raw: torch.Tensor, bands: Sequence[str], m: Modality) -> dict[str, np.ndarray]:
    """Per chip mean and std of elevation (m) and mean slope (degrees) over valid pixels (NaN when none is)."""
    out: dict[str, np.ndarray] = {}
    b = raw.shape[0]
    for band, cols in (("elevation", ("elev_mean", "elev_std")), ("slope", ("slope_mean",))):
        if band not in bands:
            for c in cols:
                out[c] = np.full(b, np.nan, np.float32)
            continue
        j = list(bands).index(band)
        scale = float(m.scale[list(m.bands).index(band)])
        x = raw[:, j].reshape(b, -1).double()
        valid = torch.isfinite(x)
        if m.nodata is not None:
            valid &= x != float(m.nodata)
        x = x * scale
        n = valid.sum(1)
        mean = torch.where(valid, x, 0.0).sum(1) / n.clamp(min=1)
        var = torch.where(valid, (x - mean[:, None]) ** 2, 0.0).sum(1) / n.clamp(min=1)
        nan = torch.full_like(mean, float("nan"))
        out[cols[0]] = torch.where(n > 0, mean, nan).numpy().astype(np.float32)
        if len(cols) > 1:
            out[cols[1]] = torch.where(n > 0, var.sqrt(), nan).numpy().astype(np.float32)
    return out


# --- distributed ---------------------------------------------------------------------------------------------------

@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool = False

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_world(device: Literal["auto", "cpu", "cuda"] = "auto") -> World:
    """Rank, world size and device from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun); the process group is
    started here when the world has more than one rank (NCCL on CUDA, Gloo on the CPU)."""
    dist = torch.distributed
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), dev)
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1:
        return World(0, 1, dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dev, owns_group=True)


# --- files ---------------------------------------------------------------------------------------------------------

def _fs(url: str, storage_options: Mapping[str, Any] | None = None):
    from m3leo_stream.storage import get_fs

    return get_fs(url, dict(storage_options or {}))


def _write_table(fs, path: str, table: pa.Table) -> None:
    """Write whole, then rename: a part file that exists is complete."""
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def _completed(fs, part_dir: str, rank: int, world: int, part_batches: int) -> int:
    """Batches of this rank already written as contiguous parts from batch 0."""
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(part_dir, detail=False)]
    except FileNotFoundError:
        return 0
    starts = {}
    for n in names:
        m = _PART.search(n)
        if m and int(m.group(1)) == rank and int(m.group(2)) == world:
            starts[int(m.group(3))] = int(m.group(4))
    done = 0
    while done in starts:
        done = starts[done]
    return done


def _encoder_digest(url: str, encoder: MultiModalEncoder) -> str:
    h = hashlib.sha256(json.dumps(encoder.config, sort_keys=True).encode())
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --- the run -------------------------------------------------------------------------------------------------------

def _batch_to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Embed ``cfg.splits`` of ``cfg.data.root`` with ``cfg.encoder``; returns where things are."""
    from m3leo_stream.encoder_card import load_encoder_and_card, require_pipeline, transforms_from_card
    from m3leo_stream.train import build_datamodule
    from m3leo_stream.transforms import build_device_transforms

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pooling: Pooling = cfg.pooling
    if pooling not in get_args(Pooling):
        raise ValueError(f"pooling must be one of {get_args(Pooling)}, not {pooling!r}")
    source: TransformsFrom = cfg.transforms_from
    if source not in get_args(TransformsFrom):
        raise ValueError(f"transforms_from must be one of {get_args(TransformsFrom)}, not {source!r}")
    named = [str(s) for s in cfg.splits]
    bad = sorted(set(named) - set(SPLITS))
    if bad:
        raise ValueError(f"splits {bad}: use train, val and/or test")
    splits = cast(list[Split], named)
    world = init_world(cfg.device)
    torch.manual_seed(int(cfg.seed))
    encoder, card = load_encoder_and_card(str(cfg.encoder))
    encoder = encoder.to(world.device).eval()
    so = plain(cfg.data.get("storage_options")) or None

    inputs = list(cfg.inputs) if cfg.get("inputs") else list(encoder.modalities)
    unknown = sorted(set(inputs) - set(encoder.modalities))
    if unknown:
        raise ValueError(f"inputs {unknown} are not modalities of the encoder ({encoder.modalities})")
    transforms_cfg = card["transforms"] if card is not None and source == "card" else plain(cfg.transforms)
    probe = build_datamodule(cast(DictConfig, OmegaConf.merge(
        cfg, {"data": {"inputs": inputs, "targets": [], "optional": inputs}})))
    have = probe.modalities
    covariates = [m for m in (cfg.get("land_cover"), cfg.get("terrain")) if m and m in have and m not in inputs]
    for m in (cfg.get("land_cover"), cfg.get("terrain")):
        if m and m not in have:
            log.info("%s is not in %s: no %s columns", m, cfg.data.root, "land-cover" if m == cfg.land_cover
                     else "terrain")
    whole = cast(dict[str, Any], plain(cfg))
    whole["data"].update(inputs=inputs, targets=covariates, optional=inputs + covariates)
    whole["transforms"] = transforms_cfg  # the whole config: the loader reads the bands these transforms use
    dm = build_datamodule(OmegaConf.create(whole))
    dm.setup("predict")
    if card is not None and source == "card":
        transforms = transforms_from_card(card, dm.modalities, train=False, seed=int(cfg.seed), rank=world.rank)
    else:
        transforms = build_device_transforms(transforms_cfg, dm.modalities, dm.shard_root.stats, inputs=inputs,
                                             targets=[], train=False, seed=int(cfg.seed), rank=world.rank)
        if card is not None:
            require_pipeline(card, transforms, dm.shard_root.stats)
        else:
            log.warning("%s has no encoder card: the input pipeline (transforms) cannot be checked against what "
                        "the encoder was trained with", cfg.encoder)
    region_names = dm.region_names
    lc_mod = dm.modalities[cfg.land_cover] if cfg.get("land_cover") in covariates else None
    tr_mod = dm.modalities[cfg.terrain] if cfg.get("terrain") in covariates else None
    if cfg.get("land_cover") in inputs or cfg.get("terrain") in inputs:
        log.warning("land cover / terrain modality is an encoder input: its summary columns are not written")
    lc_cols = land_cover_columns(lc_mod) if lc_mod is not None else []

    out = str(cfg.out)
    fs, out_path = _fs(out, so)
    parts_root = f"{out_path.rstrip('/')}/parts"
    dim = pooled_dim(encoder, pooling)
    bs = int(cfg.data.get("eval_batch_size") or cfg.data.batch_size)
    fingerprint = {"encoder": _encoder_digest(str(cfg.encoder), encoder), "pooling": pooling, "splits": splits,
                   "world_size": world.size, "eval_batch_size": bs, "inputs": inputs, "covariates": covariates,
                   "samples": {s: len(dm.catalog(s)) for s in splits}, "root": str(cfg.data.root),
                   "transforms_hash": hashlib.sha256(json.dumps(transforms.config, sort_keys=True,
                                                                default=str).encode()).hexdigest(),
                   "part_batches": int(cfg.part_batches)}
    fp_path = f"{parts_root}/{FINGERPRINT}"
    if world.rank == 0:
        fs.makedirs(parts_root, exist_ok=True)
        if fs.exists(fp_path):
            old = json.loads(fs.cat_file(fp_path))
            if old != fingerprint:
                if cfg.resume:
                    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                    raise ValueError(f"{out}: partial embeddings of a different run ({', '.join(diff)} differ); "
                                     f"use another out= or resume=false to start over")
            if old != fingerprint or not cfg.resume:
                fs.rm(parts_root, recursive=True)
                fs.makedirs(parts_root, exist_ok=True)
        elif not cfg.resume and fs.exists(parts_root):
            fs.rm(parts_root, recursive=True)
            fs.makedirs(parts_root, exist_ok=True)
        with fs.open(fp_path, "wb") as f:
            f.write(json.dumps(fingerprint, sort_keys=True).encode())
    world.barrier()

    emb_type = pa.list_(pa.float32(), dim)
    limit = cfg.get("limit_batches")
    finished = True
    t0 = time.perf_counter()
    for split in splits:
        part_dir = f"{parts_root}/{split}"
        fs.makedirs(part_dir, exist_ok=True)
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader() if split == "test" \
            else dm._eval_dataloader("train")
        sampler = loader.batch_sampler
        num = len(sampler)
        start = _completed(fs, part_dir, world.rank, world.size, int(cfg.part_batches)) if cfg.resume else 0
        if start >= num:
            log.info("%s: rank %d already done (%d batches)", split, world.rank, num)
            continue
        if start:
            log.info("%s: rank %d resumes at batch %d of %d", split, world.rank, start, num)
        sampler.start_at(start)
        rows: list[dict[str, Any]] = []
        first = start
        for i, raw in enumerate(loader, start):
            if limit is not None and i - start >= int(limit):
                finished = False
                break
            ok = raw["valid"].bool().numpy()
            cols: dict[str, Any] = {"key": list(raw["key"]), "split": [split] * len(ok),
                                    "region": [region_names[int(r)] for r in raw["region"]],
                                    "lon": raw["lon"].numpy().astype(np.float64),
                                    "lat": raw["lat"].numpy().astype(np.float64)}
            for m in inputs:
                cols[f"{m}_present"] = raw[f"{m}_present"].bool().numpy()
            if lc_mod is not None:
                frac, share = land_cover_fractions(raw[lc_mod.name], lc_mod)
                have_lc = raw[f"{lc_mod.name}_present"].bool().numpy()
                frac[~have_lc] = np.nan
                for j, c in enumerate(lc_cols):
                    cols[c] = frac[:, j]
                cols["lc_valid_share"] = np.where(have_lc, share, np.nan).astype(np.float32)
            if tr_mod is not None:
                bands = raw[BANDS_KEY][tr_mod.name]
                summ = terrain_summary(raw[tr_mod.name], bands, tr_mod)
                have_tr = raw[f"{tr_mod.name}_present"].bool().numpy()
                for c, v in summ.items():
                    v[~have_tr] = np.nan
                    cols[c] = v
            batch = transforms(_batch_to(raw, world.device), step=0)
            e = embed_batch(encoder, batch, pooling).cpu().numpy().astype(np.float32)
            cols["embedding"] = list(e)
            rows.append({k: (np.asarray(v)[ok] if not isinstance(v, list) else [x for x, g in zip(v, ok) if g])
                         for k, v in cols.items()})
            if i + 1 - first >= int(cfg.part_batches) or i + 1 == num:
                _flush(fs, part_dir, rows, world, first, i + 1, emb_type)
                rows, first = [], i + 1
        if rows:  # stopped by limit_batches: the batches read so far still count
            _flush(fs, part_dir, rows, world, first, first + len(rows), emb_type)
        if not finished:
            break
    log.info("rank %d: embedding took %.1f s", world.rank, time.perf_counter() - t0)
    world.barrier()
    result: dict[str, Any] = {"out": out, "parts": parts_root, "finished": finished, "world_size": world.size}
    if finished and world.rank == 0:
        meta = {"encoder": str(cfg.encoder), "card": card, "pooling": pooling, "dim": dim, "inputs": inputs,
                "land_cover": lc_mod.name if lc_mod else None, "land_cover_columns": lc_cols,
                "terrain": tr_mod.name if tr_mod else None,
                "terrain_columns": list(TERRAIN_COLUMNS) if tr_mod else [], "root": str(cfg.data.root),
                "regions": region_names, "transforms": transforms.config}
        table = _merge(fs, parts_root, splits, {s: dm.catalog(s) for s in splits}, meta)
        path = f"{out_path.rstrip('/')}/{OUTPUT}"
        _write_table(fs, path, table)
        meta["samples"] = {s: int(n) for s, n in zip(*np.unique(table.column("split").to_numpy(zero_copy_only=False),
                                                                 return_counts=True))}
        with fs.open(f"{out_path.rstrip('/')}/{META}", "wb") as f:
            f.write(json.dumps(meta, indent=1, default=str).encode())
        result.update(embeddings=f"{out.rstrip('/')}/{OUTPUT}", samples=meta["samples"], dim=dim)
        log.info("embeddings: %s (%s, dim %d)", result["embeddings"], meta["samples"], dim)
        print(json.dumps({"m3leo_embed": result}))
    world.barrier()
    world.close()
    return result


def _flush(fs, part_dir: str, rows: list[dict[str, Any]], world: World, first: int, end: int,
           emb_type: pa.DataType) -> None:
    """Write this rank's rows of batches [first, end) as one part file."""
    merged = {k: [x for r in rows for x in r[k]] if isinstance(rows[0][k], list)
              else np.concatenate([r[k] for r in rows]) for k in rows[0]}
    emb = merged.pop("embedding")
    flat = np.concatenate([np.asarray(e, np.float32).reshape(1, -1) for e in emb]) if emb else \
        np.zeros((0, emb_type.list_size), np.float32)
    arrays = {k: pa.array(v) for k, v in merged.items()}
    arrays["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), emb_type.list_size)
    name = f"r{world.rank:04d}of{world.size:04d}-b{first:08d}-{end:08d}.parquet"
    _write_table(fs, f"{part_dir}/{name}", pa.table(arrays))


def _merge(fs, parts_root: str, splits: Sequence[str], catalogs: Mapping[str, Any],
           meta: Mapping[str, Any]) -> pa.Table:
    """All parts of all splits as one table sorted by (split, key); every eligible chip exactly once."""
    tables = []
    for split in splits:
        part_dir = f"{parts_root}/{split}"
        names = sorted(p for p in fs.ls(part_dir, detail=False) if _PART.search(p))
        ts = []
        for p in names:
            with fs.open(p, "rb") as f:
                ts.append(pq.read_table(f))
        t = pa.concat_tables(ts) if ts else None
        keys = t.column("key").to_pylist() if t is not None else []
        if len(set(keys)) != len(keys):
            dup = len(keys) - len(set(keys))
            raise RuntimeError(f"{split}: {dup} chips embedded more than once (parts of different runs in "
                               f"{part_dir}?)")
        want = len(catalogs[split])
        if len(keys) != want:
            raise RuntimeError(f"{split}: {len(keys)} chips embedded, {want} eligible")
        tables.append(t)
    table = pa.concat_tables(tables).sort_by([("split", "ascending"), ("key", "ascending")])
    schema_meta = {b"m3leo_embed": json.dumps(meta, default=str).encode()}
    return table.replace_schema_metadata(schema_meta)


@hydra.main(config_path=CONFIG_DIR, config_name="embed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        from m3leo_stream._warnings import quiet_dependencies

        quiet_dependencies()
    run(cfg)


if __name__ == "__main__":
    main()
