"""The planner: which sample goes into which batch on which rank, as a pure function.

Everything here is deterministic numpy over the shard index; no I/O and no torch. The sample order of an epoch
depends only on (eligible index rows, seed, epoch, region quotas, block size); a global batch is a contiguous slice
of that order and rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal parts of it, so any world size dividing the
global batch sees the same global batches (elastic resume) and every rank has the same number of batches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import shard_format as sf

log = logging.getLogger(__name__)

PLANNER_VERSION = 1
PAD_FLAG = np.int64(1) << np.int64(62)
"""Bit set in a sample reference that is evaluation padding (the low bits still name a real row to read)."""


class PlanError(ValueError):
    """The requested plan is impossible (empty selection, bad weights, batch not divisible by world size)."""


@dataclass(frozen=True)
class Catalog:
    """The index rows eligible for one split: every required member present (and at least ``min_present`` of the
    ``present_of`` modalities), region selected.

    ``rows`` are positions in the index table, in index order (shard by shard); ``region`` are codes into
    ``region_names``; ``shard`` number the distinct shards (0..S-1, in the order of the index's shard column,
    which may hold names or codes). ``excluded`` counts the rows left out per required modality (and under
    ``min_present``); ``presence`` counts, per region, the eligible rows that carry each requested modality.
    """

    split: str
    region_names: tuple[str, ...]
    rows: np.ndarray
    region: np.ndarray
    shard: np.ndarray
    excluded: Mapping[str, int] = field(default_factory=dict)
    presence: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def region_counts(self) -> dict[str, int]:
        counts = np.bincount(self.region, minlength=len(self.region_names))
        return {name: int(c) for name, c in zip(self.region_names, counts)}


def build_catalog(
    index: Mapping[str, np.ndarray],
    split: str,
    region_names: Sequence[str],
    modalities: Sequence[str],
    regions: Sequence[str] | None = None,
    region_codes: np.ndarray | None = None,
    optional: Sequence[str] = (),
    min_present: int = 0,
    present_of: Sequence[str] | None = None,
    split_names: Sequence[str] | None = None,
) -> Catalog:
    """Select the rows of ``split`` in ``regions`` that carry every member of ``modalities`` not in ``optional``,
    and at least ``min_present`` members of ``present_of`` (default: ``modalities``).

    ``index`` maps column names of ``index.parquet`` to numpy arrays (``split``, ``region``, ``shard`` as strings;
    ``<modality>_nbytes`` with NaN or a negative value where the member is absent; ``region_codes``, indices into
    ``region_names`` per row, may be given to spare the string work on big indexes; with ``split_names``,
    ``split`` holds codes into it). Rows lacking a required member
    are excluded here, counted per modality and logged, so no worker ever discovers a hole; rows lacking an optional
    member are kept (the reader leaves that member out and the batch says so in ``<modality>_present``).
    """
    region_names = tuple(region_names)
    modalities = list(modalities)
    unknown_opt = sorted(set(optional) - set(modalities))
    if unknown_opt:
        raise PlanError(f"optional modalities {unknown_opt} are not requested (requested: {modalities})")
    present_of = list(modalities if present_of is None else present_of)
    if set(present_of) - set(modalities):
        raise PlanError(f"min_present counts {sorted(set(present_of) - set(modalities))}, which are not requested")
    if not 0 <= int(min_present) <= len(present_of):
        raise PlanError(f"min_present={min_present} must be in 0..{len(present_of)} (of {present_of})")
    if regions is not None:
        unknown = sorted(set(regions) - set(region_names))
        if unknown:
            raise PlanError(f"unknown regions {unknown}; the shard root has {list(region_names)}")
    split_col = np.asarray(index["split"])
    match: Any = split
    if split_names is not None:  # codes: those of no known split are negative
        match = list(split_names).index(split) if split in split_names else -(1 << 30)
    code = {name: i for i, name in enumerate(region_names)}
    if region_codes is None:
        region_codes = np.array([code[r] for r in np.asarray(index["region"])], dtype=np.int64)
    keep = split_col == match
    if regions is not None:
        keep &= np.isin(region_codes, [code[r] for r in regions])
    present: dict[str, np.ndarray] = {}
    for m in modalities:
        col = sf.nbytes_column(m)
        if col not in index:
            raise PlanError(f"modality {m!r} is not in this shard root's index")
        present[m] = _present(index[col])
    excluded: dict[str, int] = {}
    for m in modalities:
        if m in optional:
            continue
        missing = keep & ~present[m]
        if missing.any():
            excluded[m] = int(missing.sum())
        keep &= present[m]
    if min_present > 0:
        count = np.zeros(len(keep), np.int16)
        for m in present_of:
            count += present[m]
        few = keep & (count < int(min_present))
        if few.any():
            excluded[f"fewer than {int(min_present)} of {'+'.join(present_of)}"] = int(few.sum())
        keep &= ~few
    rows = np.flatnonzero(keep).astype(np.int64, copy=False)
    if excluded:
        log.info("%s: %d samples excluded for missing members (%s)", split, int((split_col == match).sum()) - len(rows),
                 ", ".join(f"{m}: {n}" for m, n in excluded.items()))
    region = np.asarray(region_codes)[rows].astype(np.int16, copy=False)
    counts = np.bincount(region, minlength=len(region_names))
    per_region = {m: np.bincount(region[present[m][rows]], minlength=len(region_names)) if m in optional else counts
                  for m in modalities}  # every kept row carries the required members
    presence = {
        name: {m: int(per_region[m][r]) for m in modalities}
        for r, name in enumerate(region_names) if regions is None or name in regions
    }
    shard = _dense_codes(np.asarray(index["shard"])[rows])
    # narrow codes: every rank holds its catalogue (at 17M samples, int64 region and shard codes took 220 MB more)
    return Catalog(split, region_names, rows, region, shard.astype(np.int32, copy=False), excluded, presence)


def _dense_codes(values: np.ndarray) -> np.ndarray:
    """Each value's rank among the distinct values (``np.unique``'s inverse); for non-negative integer codes in
    one pass instead of a sort."""
    if values.dtype.kind in "iu" and len(values) and values.min() >= 0 and values.max() < 4 * len(values) + 1024:
        seen = np.zeros(int(values.max()) + 1, np.bool_)
        seen[values] = True
        return (np.cumsum(seen, dtype=np.int64) - 1).astype(np.int32)[values]
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def _present(nbytes: np.ndarray) -> np.ndarray:
    a = np.asarray(nbytes)
    if a.dtype.kind == "f":
        return ~np.isnan(a) & (a >= 0)
    if a.dtype == object:
        return np.array([x is not None for x in a], dtype=bool)
    return a >= 0


def region_quotas(counts: Mapping[str, int], weights: Mapping[str, float] | None,
                  total: int | None = None) -> dict[str, int]:
    """Samples per region per epoch.

    Without weights every sample is used once (quota = count). With weights, ``total`` (default: all samples of the
    weighted regions) is apportioned by largest remainder, so quotas are exact integers summing to ``total``.
    """
    if weights is None:
        if total is None:
            return {r: int(n) for r, n in counts.items()}
        weights = {r: float(n) for r, n in counts.items()}
    unknown = sorted(set(weights) - set(counts))
    if unknown:
        raise PlanError(f"region_weights name regions without eligible samples or not selected: {unknown}")
    w = {r: float(weights.get(r, 0.0)) for r in counts}
    if any(v < 0 or not np.isfinite(v) for v in w.values()) or sum(w.values()) <= 0:
        raise PlanError(f"region_weights must be finite, non-negative and not all zero: {dict(weights)}")
    empty = [r for r, v in w.items() if v > 0 and counts[r] == 0]
    if empty:
        raise PlanError(f"region_weights give weight to regions with no eligible samples: {empty}")
    if total is None:
        total = sum(n for r, n in counts.items() if w[r] > 0)
    s = sum(w.values())
    exact = {r: total * v / s for r, v in w.items()}
    quotas = {r: int(np.floor(x)) for r, x in exact.items()}
    left = total - sum(quotas.values())
    order = sorted(exact, key=lambda r: (-(exact[r] - quotas[r]), r))
    for r in order[:left]:
        quotas[r] += 1
    return quotas


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([PLANNER_VERSION, int(seed), *map(int, keys)])))


def _region_permutation(cat: Catalog, members: np.ndarray, seed: int, region: int, cycle: int,
                        shuffle_shards: int) -> np.ndarray:
    """One pass over a region's samples: shards shuffled, grouped in blocks of ``shuffle_shards``, samples permuted
    within each block. Positions into ``cat.rows``."""
    rng = _rng(seed, 1, region, cycle)
    # the region's samples grouped by shard (members are in index order, so sorting by shard is stable; an index
    # written shard by shard is in that order already)
    codes = cat.shard[members]
    if (codes[1:] >= codes[:-1]).all():
        ordered, by_shard = members, codes
        shards = codes[np.flatnonzero(np.diff(codes, prepend=codes[:1] - 1))] if len(codes) else codes
    else:
        ordered = members[np.argsort(codes, kind="stable")]
        by_shard, shards = cat.shard[ordered], np.unique(codes)
    shards = shards[rng.permutation(len(shards))]
    k = max(1, int(shuffle_shards))
    starts = np.searchsorted(by_shard, shards, side="left")
    ends = np.searchsorted(by_shard, shards, side="right")
    parts = []
    for b in range(0, len(shards), k):
        block = np.concatenate([ordered[i:j] for i, j in zip(starts[b:b + k], ends[b:b + k])])
        parts.append(block[rng.permutation(len(block))])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def train_order(cat: Catalog, seed: int, epoch: int, quotas: Mapping[str, int] | None = None,
                shuffle_shards: int = 8) -> np.ndarray:
    """The epoch's sample sequence as positions into ``cat.rows``.

    Each region walks its own stream of block-shuffled passes; epoch ``e`` takes the next ``quota`` samples of it,
    so down-sampled regions rotate through all their samples across epochs and up-sampled ones repeat a sample only
    after using every other. Regions are interleaved in proportion (sample ``k`` of a region with quota ``q`` lands
    near ``k/q`` of the epoch).
    """
    counts = cat.region_counts()
    quotas = dict(quotas) if quotas is not None else counts
    seqs, keys = [], []
    mix = _rng(seed, 2, epoch)
    for r, name in enumerate(cat.region_names):
        q, n = int(quotas.get(name, 0)), counts[name]
        if q == 0:
            continue
        if n == 0:
            raise PlanError(f"region {name} has a quota of {q} but no eligible samples")
        members = np.flatnonzero(cat.region == r)
        start, stop = epoch * q, (epoch + 1) * q
        passes = [_region_permutation(cat, members, seed, r, c, shuffle_shards)
                  for c in range(start // n, (stop - 1) // n + 1)]
        stream = np.concatenate(passes)
        off = (start // n) * n
        seqs.append(stream[start - off:stop - off])
        keys.append((np.arange(q) + mix.random(q)) / q)
    if not seqs:
        return np.zeros(0, np.int64)
    order = np.argsort(np.concatenate(keys), kind="stable")
    return np.concatenate(seqs)[order]


@dataclass(frozen=True)
class EpochPlan:
    """Batches of one epoch: global batch ``g`` is ``refs[g*G:(g+1)*G]``; rank ``r`` takes its ``r``-th part."""

    refs: np.ndarray  # index rows, with PAD_FLAG set on padding
    global_batch: int

    @property
    def num_batches(self) -> int:
        return len(self.refs) // self.global_batch

    def rank_batch(self, g: int, rank: int, world_size: int) -> list[int]:
        if self.global_batch % world_size:
            raise PlanError(f"global batch {self.global_batch} is not divisible by world size {world_size}")
        b = self.global_batch // world_size
        start = g * self.global_batch + rank * b
        return self.refs[start:start + b].tolist()

    def ranks_refs(self, ranks: Sequence[int], world_size: int) -> np.ndarray:
        """What ``ranks`` read, as an array of shape ``(num_batches, len(ranks), global_batch // world_size)``:
        ``[g, k]`` is ``rank_batch(g, ranks[k], world_size)`` (a view of ``refs`` for consecutive ranks)."""
        if self.global_batch % world_size:
            raise PlanError(f"global batch {self.global_batch} is not divisible by world size {world_size}")
        ranks = [int(r) for r in ranks]
        if any(not 0 <= r < world_size for r in ranks):
            raise PlanError(f"ranks {ranks} are not all in 0..{world_size - 1}")
        n = self.num_batches
        parts = np.asarray(self.refs)[:n * self.global_batch].reshape(n, world_size, self.global_batch // world_size)
        if ranks and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
            return parts[:, ranks[0]:ranks[0] + len(ranks)]
        return parts[:, ranks]


def plan_train_epoch(cat: Catalog, *, seed: int, epoch: int, global_batch: int,
                     region_weights: Mapping[str, float] | None = None, samples_per_epoch: int | None = None,
                     shuffle_shards: int = 8) -> EpochPlan:
    """Training plan: ``floor(E / G)`` full global batches of the epoch's order (the remainder, fewer than one
    global batch, is left out of this epoch; a different set each epoch)."""
    if global_batch <= 0:
        raise PlanError("global batch must be positive")
    quotas = region_quotas(cat.region_counts(), region_weights, samples_per_epoch)
    order = train_order(cat, seed, epoch, quotas, shuffle_shards)
    n = (len(order) // global_batch) * global_batch
    if n == 0:
        raise PlanError(f"{cat.split}: {len(order)} samples per epoch, fewer than one global batch of {global_batch}")
    return EpochPlan(cat.rows[order[:n]], global_batch)


def plan_eval(cat: Catalog, *, global_batch: int) -> EpochPlan:
    """Evaluation plan: every sample once in index order, the last global batch padded with flagged repeats."""
    if len(cat) == 0:
        raise PlanError(f"{cat.split}: no eligible samples")
    n = len(cat)
    padded = -(-n // global_batch) * global_batch
    refs = np.concatenate([cat.rows, cat.rows[np.arange(padded - n) % n] | PAD_FLAG])
    return EpochPlan(refs, global_batch)


def is_padding(ref: int) -> bool:
    return bool(int(ref) & int(PAD_FLAG))


def row_of(ref: int) -> int:
    return int(ref) & ~int(PAD_FLAG)
