"""Multi-modal masked autoencoder (MAE) and its reusable encoder.

One patch embedding per input modality (a strided convolution), a shared ViT encoder, fixed 2-D sin-cos position
embeddings plus a learned embedding per modality, random masking of ``mask_ratio`` of all tokens (over every
modality jointly), and a light decoder that reconstructs every modality's masked patches of the standardised
inputs (optionally per-patch normalised, ``norm_pix_loss``). The loss is computed per modality over masked patches,
weighted by the ``<mod>_valid`` pixel masks and the ``<mod>_channel_valid`` channel masks (missing bands), and leaves
out modalities dropped for a sample (``<mod>_dropped``) or absent from it (``<mod>_present`` False): their tokens are
always masked and never scored.

The ViT blocks are ``torch.nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`` (pre-norm, GELU MLP) —
the same block layout as timm's ``Block`` — because timm (and torchvision) cannot be installed next to the torch
build this project pins; weights are therefore not interchangeable with timm checkpoints.

:class:`MultiModalEncoder` can be saved and loaded alone (:func:`save_encoder`, :func:`load_encoder`, which also
accepts a Lightning checkpoint of a pretraining run) and is what downstream tasks (:class:`MAESegmentation`) use.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 192, "depth": 12, "heads": 3},
    "small": {"dim": 384, "depth": 12, "heads": 6},
    "base": {"dim": 768, "depth": 12, "heads": 12},
    "large": {"dim": 1024, "depth": 24, "heads": 16},
}
"""ViT sizes (width, depth, heads); MLP width is ``mlp_ratio × dim`` (4 by default)."""


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim) fixed 2-D sin-cos position embedding (MAE convention: half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], 1)

    return torch.cat([emb(ys), emb(xs)], 1).float()


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=dropout, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(depth)
    )


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)


def vit_config(size: str = "base", dim: int | None = None, depth: int | None = None,
               heads: int | None = None) -> dict[str, int]:
    """Width/depth/heads of a named size (:data:`VIT_SIZES`), each overridable."""
    if size not in VIT_SIZES and not (dim and depth and heads):
        raise ValueError(f"unknown ViT size {size!r} (known: {', '.join(VIT_SIZES)}); or give dim, depth and heads")
    base = dict(VIT_SIZES.get(size, {}))
    for k, v in (("dim", dim), ("depth", depth), ("heads", heads)):
        if v:
            base[k] = int(v)
    return base


class MultiModalEncoder(nn.Module):
    """Shared ViT encoder over the patch tokens of several modalities.

    ``in_channels`` maps each input modality to its channel count (after the device transforms). Every modality is
    resized onto the largest input's grid and cut into ``patch_size`` patches, so all modalities share one token
    grid; token = patch embedding + sin-cos position + modality embedding. Position embeddings are computed for the
    grid of the batch, so the encoder runs at any input size divisible by ``patch_size``.
    """

    def __init__(self, in_channels: Mapping[str, int], size: str = "base", patch_size: int = 16,
                 dim: int | None = None, depth: int | None = None, heads: int | None = None,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        v = vit_config(size, dim, depth, heads)
        self.config: dict[str, Any] = {"in_channels": dict(in_channels), "size": size, "patch_size": int(patch_size),
                                       "dim": v["dim"], "depth": v["depth"], "heads": v["heads"],
                                       "mlp_ratio": float(mlp_ratio), "dropout": float(dropout)}
        self.modalities = list(in_channels)
        self.patch_size = int(patch_size)
        self.dim = v["dim"]
        self.patch_embed = nn.ModuleDict(
            {m: nn.Conv2d(c, self.dim, self.patch_size, stride=self.patch_size) for m, c in in_channels.items()})
        self.modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(1, 1, self.dim)) for m in self.modalities})
        self.blocks = _blocks(self.dim, v["depth"], v["heads"], mlp_ratio, dropout)
        self.norm = nn.LayerNorm(self.dim)
        self._pos: dict[tuple[int, str], torch.Tensor] = {}
        for p in self.modality_embed.values():
            nn.init.normal_(p, std=0.02)
        for conv in self.patch_embed.values():
            weight, bias = cast(torch.Tensor, conv.weight), cast(torch.Tensor, conv.bias)
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(bias)

    def pos_embed(self, grid: int, device: torch.device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._pos:
            self._pos[key] = sincos_pos_embed(self.dim, grid).to(device).unsqueeze(0)
        return self._pos[key]

    def grid_of(self, inputs: Mapping[str, torch.Tensor], modalities: Sequence[str]) -> int:
        side = max(inputs[m].shape[-1] for m in modalities)
        if side % self.patch_size:
            raise ValueError(f"input side {side} px is not divisible by the patch size {self.patch_size}")
        return side // self.patch_size

    def present(self, inputs: Mapping[str, Any]) -> list[str]:
        """The encoder's modalities present in ``inputs`` (at least one is required)."""
        mods = [m for m in self.modalities if m in inputs]
        if not mods:
            raise KeyError(f"encoder needs one of {self.modalities}; batch has {sorted(map(str, inputs))}")
        return mods

    def tokenize(self, inputs: Mapping[str, torch.Tensor],
                 modalities: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str], int]:
        """(B, M·N, D) tokens of ``modalities`` (default: all present), their order, and the grid side."""
        mods = list(modalities) if modalities is not None else self.present(inputs)
        grid = self.grid_of(inputs, mods)
        side = grid * self.patch_size
        dtype = next(self.patch_embed[mods[0]].parameters()).dtype
        toks = []
        for m in mods:
            x = _resize(inputs[m], side).to(dtype)
            if x.shape[1] != self.config["in_channels"][m]:
                raise ValueError(f"encoder: modality {m!r} has {x.shape[1]} channels, the encoder was built for "
                                 f"{self.config['in_channels'][m]} (check the transforms' band selection)")
            t = self.patch_embed[m](x).flatten(2).transpose(1, 2)  # (B, N, D)
            toks.append(t + self.pos_embed(grid, t.device).to(t.dtype) + self.modality_embed[m].to(t.dtype))
        return torch.cat(toks, 1), mods, grid

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unmasked features: (B, D, grid, grid), the mean over the present modalities' tokens at each position."""
        tokens, mods, grid = self.tokenize(inputs)
        z = self.encode_tokens(tokens)
        b = z.shape[0]
        z = z.view(b, len(mods), grid * grid, self.dim).mean(1)
        return z.transpose(1, 2).reshape(b, self.dim, grid, grid)


def _hidden(batch: Mapping[str, Any], m: str, device: torch.device) -> torch.Tensor | None:
    """(B,) bool: modality ``m`` is dropped (``<m>_dropped``) or absent (``<m>_present`` False) for the sample;
    ``None`` when the batch says neither."""
    dropped, present = batch.get(f"{m}_dropped"), batch.get(f"{m}_present")
    out = None if dropped is None else dropped.to(device).bool().view(-1)
    if present is not None:
        absent = ~present.to(device).bool().view(-1)
        out = absent if out is None else out | absent
    return out


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, p·p·C) patches in row-major order (channel last within a patch)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = x.shape
    g = int(round(n ** 0.5))
    x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


class MultiModalMAE(nn.Module):
    """The masked autoencoder: :class:`MultiModalEncoder` + a light transformer decoder with one linear
    reconstruction head per modality.

    ``forward(batch)`` returns a dict with ``loss`` (mean of the per-modality losses that have any weight),
    ``loss/<mod>``, ``weight/<mod>`` (number of valid masked pixels), ``pred/<mod>`` (B, N, p·p·C) and ``mask``
    (B, M·N) with 1 = masked.
    """

    def __init__(self, in_channels: Mapping[str, int], size: str = "base", patch_size: int = 16,
                 dim: int | None = None, depth: int | None = None, heads: int | None = None, mlp_ratio: float = 4.0,
                 mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 4, decoder_heads: int = 16,
                 norm_pix_loss: bool = False, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = MultiModalEncoder(in_channels, size, patch_size, dim, depth, heads, mlp_ratio, dropout)
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.decoder_dim = int(decoder_dim)
        d = self.encoder.dim
        self.decoder_embed = nn.Linear(d, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(1, 1, decoder_dim)) for m in in_channels})
        self.decoder_blocks = _blocks(decoder_dim, decoder_depth, decoder_heads, mlp_ratio, dropout)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        p = self.encoder.patch_size
        self.heads = nn.ModuleDict({m: nn.Linear(decoder_dim, p * p * c) for m, c in in_channels.items()})
        self._dpos: dict[tuple[int, str], torch.Tensor] = {}
        nn.init.normal_(self.mask_token, std=0.02)
        for prm in self.decoder_modality_embed.values():
            nn.init.normal_(prm, std=0.02)

    @property
    def modalities(self) -> list[str]:
        return self.encoder.modalities

    def decoder_pos(self, grid: int, device: torch.device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._dpos:
            self._dpos[key] = sincos_pos_embed(self.decoder_dim, grid).to(device).unsqueeze(0)
        return self._dpos[key]

    def random_mask(self, b: int, mods: Sequence[str], n: int, batch: Mapping[str, Any], device: torch.device,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token order by random noise; tokens of dropped or absent modalities sort last (always masked).

        Returns (ids_shuffle, ids_restore, mask) with ``mask`` 1 where masked, (B, M·N)."""
        total = len(mods) * n
        keep = max(1, int(round(total * (1 - self.mask_ratio))))
        noise = torch.rand(b, total, device=device, generator=generator)
        for i, m in enumerate(mods):
            hidden = _hidden(batch, m, device)
            if hidden is not None:
                noise[:, i * n:(i + 1) * n] += 2.0 * hidden.float().view(-1, 1)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(b, total, device=device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_shuffle[:, :keep], ids_restore, mask

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        enc = self.encoder
        tokens, mods, grid = enc.tokenize(batch)
        b, _, d = tokens.shape
        n = grid * grid
        ids_keep, ids_restore, mask = self.random_mask(b, mods, n, batch, tokens.device, generator)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        latent = enc.encode_tokens(visible)
        x = self.decoder_embed(latent)
        total = len(mods) * n
        filler = self.mask_token.to(x.dtype).expand(b, total - x.shape[1], -1)
        x = torch.cat([x, filler], 1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        pos = self.decoder_pos(grid, x.device).to(x.dtype)
        x = x + torch.cat([pos + self.decoder_modality_embed[m].to(x.dtype) for m in mods], 1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        out: dict[str, Any] = {"mask": mask, "modalities": mods, "grid": grid}
        p = enc.patch_size
        side = grid * p
        losses, scored = [], []
        for i, m in enumerate(mods):
            pred = self.heads[m](x[:, i * n:(i + 1) * n]).float()
            target = patchify(_resize(batch[m], side).float(), p)
            c = batch[m].shape[1]
            if self.norm_pix_loss:
                mu = target.mean(-1, keepdim=True)
                var = target.var(-1, keepdim=True)
                target = (target - mu) / (var + 1e-6).sqrt()
            # one weight per pixel of a patch (B, N, p·p), shared by its c channels: never a (B, N, p·p·c) copy
            valid = batch.get(f"{m}_valid")
            if valid is not None:
                weight = patchify(_resize(valid.float(), side), p) > 0.5
                weight = weight.float() * mask[:, i * n:(i + 1) * n].unsqueeze(-1)
            else:
                weight = mask[:, i * n:(i + 1) * n].unsqueeze(-1).expand(-1, -1, p * p)
            hidden = _hidden(batch, m, weight.device)
            if hidden is not None:
                weight = weight * (~hidden).float().view(-1, 1, 1)
            rowvalid = batch.get("valid")
            if isinstance(rowvalid, torch.Tensor):
                weight = weight * rowvalid.to(weight.device).float().view(-1, 1, 1)
            sq = (pred - target) ** 2
            chan = batch.get(f"{m}_channel_valid")  # (B, C): False for a band missing in that chip
            if chan is not None:
                cw = chan.to(weight.device).float()
                sq = sq.view(b, n, p * p, c) * cw.view(b, 1, 1, c)
                wsum = (weight.sum((1, 2)) * cw.sum(1)).sum()  # scored values: pixels × present channels
            else:
                wsum = weight.sum() * c  # scored values: pixels × channels
            sq = sq.view(b, n, p * p, c).sum(-1)
            err = (sq * weight).sum()
            loss_m = err / wsum.clamp(min=1.0)
            out[f"pred/{m}"] = pred
            out[f"loss/{m}"] = loss_m
            out[f"sqerr/{m}"] = err.detach()
            out[f"weight/{m}"] = wsum.detach()
            losses.append(loss_m)  # always in the graph (DDP), 0 when nothing is scored; no host sync
            scored.append((wsum > 0).float())
        out["loss"] = torch.stack(losses).sum() / torch.stack(scored).sum().clamp(min=1.0) if losses \
            else tokens.sum() * 0.0
        return out

    def reconstruct(self, batch: Mapping[str, Any], out: Mapping[str, Any], modality: str) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
        """(reconstruction with visible patches from the input, masked input) of ``modality``, (B, C, S, S)."""
        mods, grid = out["modalities"], out["grid"]
        i = mods.index(modality)
        n = grid * grid
        p = self.encoder.patch_size
        c = batch[modality].shape[1]
        x = patchify(_resize(batch[modality], grid * p).float(), p)
        pred = out[f"pred/{modality}"].detach().float()
        if self.norm_pix_loss:  # show predictions in the input's scale
            mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mu
        m = out["mask"][:, i * n:(i + 1) * n].unsqueeze(-1)
        recon = unpatchify(x * (1 - m) + pred * m, p, c)
        masked = unpatchify(x * (1 - m), p, c)
        return recon, masked


class MAESegmentation(nn.Module):
    """Segmentation with a (pretrained) :class:`MultiModalEncoder`: features (B, D, g, g) → stages of [conv 3×3,
    BN, ReLU] with ×2 bilinear up-sampling between them → 1×1 conv to ``num_classes`` logits (no activation),
    resized to the output size.

    The stages are built for the sizes of the run, ``input_size`` (the side of the inputs, g = input_size / patch)
    and ``output_size`` (the side of the label): as many as it takes for the features to pass half the output side,
    so every parameter is used in every step (DDP with ``find_unused_parameters=False``)."""

    def __init__(self, encoder: MultiModalEncoder, num_classes: int, decoder_channels: int = 256,
                 freeze_encoder: bool = False, input_size: int = 448, output_size: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            for prm in self.encoder.parameters():
                prm.requires_grad_(False)
        self.decoder_channels = int(decoder_channels)
        self.num_classes = int(num_classes)
        self.output_size = int(output_size or input_size)
        grid = max(1, int(input_size) // encoder.patch_size)
        stages = 1
        while grid * 2 ** stages <= self.output_size:
            stages += 1
        chans = [encoder.dim] + [max(self.decoder_channels // 2 ** i, 32) for i in range(stages)]
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                          nn.ReLU(inplace=True))
            for i in range(stages))
        self.out = nn.Conv2d(chans[-1], num_classes, 1)

    def forward(self, inputs: Mapping[str, torch.Tensor], output_size: int | None = None) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                z = self.encoder(inputs)
        else:
            z = self.encoder(inputs)
        size = output_size or self.output_size
        for i, stage in enumerate(self.ups):
            if i:
                z = F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
            z = stage(z)
        logits = self.out(z)
        if logits.shape[-1] != size:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        return logits


def _open(url: str, mode: str):
    import fsspec

    return fsspec.open(url, mode)


def save_encoder(encoder: MultiModalEncoder, url: str, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``{"config", "state_dict", **extra}`` of the encoder to a path or fsspec URL (atomic on local disk
    and object stores: written whole)."""
    buf = io.BytesIO()
    torch.save({"kind": "m3leo_stream.MultiModalEncoder", "config": encoder.config,
                "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, **dict(extra or {})},
               buf)
    with _open(url, "wb") as f:
        f.write(buf.getvalue())


def load_encoder(url: str, map_location: str | torch.device = "cpu") -> MultiModalEncoder:
    """Load an encoder saved by :func:`save_encoder`, or extract it from a Lightning checkpoint of the pretraining
    task (``state_dict`` keys ``model.encoder.*`` and ``hyper_parameters.encoder_config``)."""
    try:
        with _open(url, "rb") as f:
            obj = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"encoder checkpoint {url} not found (run experiment=pretrain_mae first or set "
                                f"model.encoder to a checkpoint path or URL)") from None
    if isinstance(obj, Mapping) and obj.get("kind") == "m3leo_stream.MultiModalEncoder":
        config, state = obj["config"], obj["state_dict"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and "encoder_config" in (obj.get("m3leo") or {}):
        config = obj["m3leo"]["encoder_config"]
        prefix = "model.encoder."
        state = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    else:
        raise ValueError(f"{url}: neither an encoder file (save_encoder) nor a pretraining checkpoint")
    enc = MultiModalEncoder(**config)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{url}: encoder weights do not match its config (missing {missing}, "
                         f"unexpected {unexpected})")
    log.info("loaded encoder %s (%s) from %s", config.get("size"), list(config["in_channels"]), url)
    return enc
