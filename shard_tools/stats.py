"""Per-band statistics over valid pixels, mergeable across shards, workers and array-job tasks.

8- and 16-bit integer bands keep an exact value histogram, from which count, mean, std, min, max and percentiles
follow exactly. Float bands keep exact moments (count, mean, M2 merged with Chan's formula), exact min/max, and a
histogram over the top 16 bits of the float32 bit pattern (sign, exponent, 7 mantissa bits): percentiles are exact
to within 2**-7 relative (linear within a bucket). The result does not depend on the order of merging.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from m3leo_stream.modalities import Modality, nodata_mask, nodata_value
from m3leo_stream.shard_format.stats import PERCENTILES
from m3leo_stream.shard_format.stats import percentile_key as _pct_key


def _exact_int(dtype: np.dtype) -> bool:
    return dtype.kind in "iu" and dtype.itemsize <= 2


def _add_exact_histogram(hist: np.ndarray, flat: np.ndarray) -> None:
    """Add the value counts of a (C, N) 8/16-bit integer array to ``hist`` (C, 2**bits), indexed by
    ``value - dtype.min``.

    8-bit bands: Pillow's histogram of the unsigned bit pattern, mapped as a one-row 8-bit image without a copy
    (a plain C counting loop; faster than ``torch.bincount``, and numpy's makes an int64 copy).
    16-bit bands whose values span at most 2**15 - 1 (the usual case): ``torch.bincount`` of ``value - min`` in
    16-bit arithmetic, into a short count vector. Other 16-bit bands: ``np.bincount`` over all 65536 bit patterns.
    Signed bit patterns index the wanted histogram rotated by half the range, so their counts are added in two
    halves. torch runs single-threaded here: its threaded bincount is many times slower on a loaded machine.
    """
    bits = 8 * flat.dtype.itemsize
    nbins = 1 << bits
    half = nbins // 2
    signed = flat.dtype.kind == "i"
    u = np.ascontiguousarray(flat).view(np.uint8 if bits == 8 else np.uint16)

    def add(b: int, h: np.ndarray) -> None:
        if signed:
            hist[b, :half] += h[half:]
            hist[b, half:] += h[:half]
        else:
            hist[b] += h

    if bits == 8:
        from PIL import Image

        for b in range(u.shape[0] if u.shape[1] else 0):
            add(b, np.asarray(Image.frombuffer("L", (u.shape[1], 1), u[b], "raw", "L", 0, 1).histogram(), np.int64))
        return
    import torch

    with warnings.catch_warnings():  # read-only input (decoded from bytes): bincount only reads it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(u.view(np.int16))
    with _torch_single_thread(torch):
        lo, hi = flat.min(axis=1).astype(np.int64), flat.max(axis=1).astype(np.int64)
        base = -half if signed else 0
        for b in range(u.shape[0]):
            if hi[b] - lo[b] < half and (signed or hi[b] < half):
                # stored value v as int16 (the same bits); v - lo is in [0, hi - lo] and wraps correctly
                h = torch.bincount(t[b] - torch.tensor(np.int16(lo[b])),
                                   minlength=int(hi[b] - lo[b]) + 1).numpy()
                hist[b, lo[b] - base: hi[b] - base + 1] += h
                continue
            add(b, np.bincount(u[b], minlength=nbins))


class _torch_single_thread:
    """Run a block with one intra-op torch thread (restored afterwards)."""

    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.prev = self.torch.get_num_threads()
        if self.prev != 1:
            self.torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.prev != 1:
            self.torch.set_num_threads(self.prev)


def _float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving 16-bit bucket keys of float32 values."""
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    neg = (bits >> 31).astype(bool)
    ordered = np.where(neg, ~bits, bits | np.uint32(0x80000000))
    return (ordered >> 16).astype(np.int64)


def _bucket_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value ranges [lo, hi] of float bucket keys (float64 arrays)."""
    def decode(ordered: np.ndarray) -> np.ndarray:
        raw = np.where(ordered & np.uint32(0x80000000), ordered & np.uint32(0x7FFFFFFF), ~ordered)
        return raw.view(np.float32).astype(np.float64)

    k = np.asarray(keys).astype(np.uint32) << np.uint32(16)
    a, b = decode(k), decode(k | np.uint32(0xFFFF))
    return np.where(b < a, b, a), np.where(b > a, b, a)


class ModalityStats:
    """Accumulates statistics of one modality over one scope (a region or everything)."""

    def __init__(self, modality: Modality):
        self.m = modality
        self.dtype = modality.np_dtype
        c = len(modality.bands)
        self.exact = _exact_int(self.dtype)
        self.offset = int(np.iinfo(self.dtype).min) if self.exact else 0
        self.nbins = 2 ** (8 * self.dtype.itemsize) if self.exact else 65536
        self.hist = np.zeros((c, self.nbins), dtype=np.int64)
        self.total = np.zeros(c, dtype=np.int64)  # all pixels, valid or not
        self.count = np.zeros(c, dtype=np.int64)
        self.mean = np.zeros(c, dtype=np.float64)
        self.m2 = np.zeros(c, dtype=np.float64)
        self.vmin = np.full(c, np.inf)
        self.vmax = np.full(c, -np.inf)
        self.samples = 0

    def _nodata_is_value(self) -> bool:
        return nodata_value(self.m.nodata) is not None

    def add(self, array: np.ndarray) -> None:
        """Add one (C,H,W) array in the modality's dtype."""
        c = array.shape[0]
        flat = array.reshape(c, -1)
        self.samples += 1
        self.total += flat.shape[1]
        if self.exact:
            _add_exact_histogram(self.hist, flat)
            return
        for b in range(c):
            v = flat[b]
            v = v[~nodata_mask(v, self.m.nodata)]
            n = v.size
            if n == 0:
                continue
            v64 = v.astype(np.float64)
            mean = float(v64.mean())
            m2 = float(((v64 - mean) ** 2).sum())
            self._merge_moments(b, n, mean, m2)
            self.vmin[b] = min(self.vmin[b], float(v64.min()))
            self.vmax[b] = max(self.vmax[b], float(v64.max()))
            keys = _float_keys(v)
            lo, hi = int(keys.min()), int(keys.max())  # count into a short vector: chips span few buckets
            self.hist[b, lo:hi + 1] += np.bincount(keys - lo, minlength=hi - lo + 1)

    def _merge_moments(self, b: int, n: int, mean: float, m2: float) -> None:
        na = self.count[b]
        if na == 0:
            self.count[b], self.mean[b], self.m2[b] = n, mean, m2
            return
        tot = na + n
        delta = mean - self.mean[b]
        self.mean[b] += delta * n / tot
        self.m2[b] += m2 + delta * delta * na * n / tot
        self.count[b] = tot

    def merge(self, other: ModalityStats) -> None:
        self.samples += other.samples
        self.total += other.total
        self.hist += other.hist
        if not self.exact:
            for b in range(len(self.count)):
                if other.count[b]:
                    self._merge_moments(b, int(other.count[b]), float(other.mean[b]), float(other.m2[b]))
            self.vmin = np.minimum(self.vmin, other.vmin)
            self.vmax = np.maximum(self.vmax, other.vmax)

    # -- serialisation of partial state (per-shard build records) --

    def state(self) -> dict[str, Any]:
        nz = [np.nonzero(h)[0] for h in self.hist]
        return {
            "samples": self.samples,
            "total": self.total.tolist(),
            "hist": [[idx.tolist(), self.hist[b, idx].tolist()] for b, idx in enumerate(nz)],
            "count": self.count.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist(),
            "min": [x if math.isfinite(x) else None for x in self.vmin.tolist()],
            "max": [x if math.isfinite(x) else None for x in self.vmax.tolist()],
        }

    def merge_state(self, state: Mapping[str, Any]) -> None:
        """``self.merge(ModalityStats.from_state(self.m, state))`` without building the dense histogram: the same
        operations in the same order, the sparse counts added in place."""
        self.merge_counts(state)
        if not self.exact:
            self.merge_moments(state["count"], state["mean"], state["m2"])

    def merge_counts(self, state: Mapping[str, Any]) -> None:
        """The order-independent part of :meth:`merge_state`: sample and pixel counts, histogram, min and max
        (integer sums and extrema, exact in any order). States can be summed this way ahead of time, e.g. per
        build task, as long as their moments are merged in the original order (:meth:`merge_moments`)."""
        self.samples += int(state["samples"])
        self.total += np.asarray(state["total"], dtype=np.int64)
        for b, (idx, counts) in enumerate(state["hist"]):
            self.hist[b, np.asarray(idx, dtype=np.int64)] += np.asarray(counts, dtype=np.int64)
        if not self.exact:
            self.vmin = np.minimum(self.vmin, [np.inf if x is None else x for x in state["min"]])
            self.vmax = np.maximum(self.vmax, [-np.inf if x is None else x for x in state["max"]])

    def merge_moments(self, count: Sequence[float], mean: Sequence[float], m2: Sequence[float]) -> None:
        """The order-dependent part of :meth:`merge_state` (float bands' mean and M2, Chan's formula): the result
        is byte-identical only when states are merged in the same order."""
        n = np.asarray(count, dtype=np.int64)
        mu = np.asarray(mean, dtype=np.float64)
        q = np.asarray(m2, dtype=np.float64)
        for b in range(len(self.count)):
            if n[b]:
                self._merge_moments(b, int(n[b]), float(mu[b]), float(q[b]))

    @classmethod
    def from_state(cls, modality: Modality, state: Mapping[str, Any]) -> ModalityStats:
        s = cls(modality)
        s.samples = int(state["samples"])
        s.total = np.asarray(state["total"], dtype=np.int64)
        for b, (idx, counts) in enumerate(state["hist"]):
            s.hist[b, np.asarray(idx, dtype=np.int64)] = np.asarray(counts, dtype=np.int64)
        s.count = np.asarray(state["count"], dtype=np.int64)
        s.mean = np.asarray(state["mean"], dtype=np.float64)
        s.m2 = np.asarray(state["m2"], dtype=np.float64)
        s.vmin = np.asarray([np.inf if x is None else x for x in state["min"]], dtype=np.float64)
        s.vmax = np.asarray([-np.inf if x is None else x for x in state["max"]], dtype=np.float64)
        return s

    # -- final statistics --

    def summary(self) -> dict[str, Any]:
        """The per-band statistics written to ``stats.json``."""
        out: dict[str, Any] = {"num_samples": self.samples}
        hist = self.hist  # the nodata column is zeroed for the summary and restored after (no copy of it all)
        nd_col = None
        if self.exact and self._nodata_is_value():
            nd_col = int(self.m.nodata) - self.offset  # type: ignore[arg-type]
        saved = hist[:, nd_col].copy() if nd_col is not None else None
        if nd_col is not None:
            hist[:, nd_col] = 0
        try:
            self._summary_bands(out, hist)
        finally:
            if nd_col is not None:
                hist[:, nd_col] = saved
        return out

    def _summary_bands(self, out: dict[str, Any], hist: np.ndarray) -> None:
        c = len(self.m.bands)
        counts, means, stds, mins, maxs, nodata = [], [], [], [], [], []
        pcts: dict[str, list[float | None]] = {_pct_key(p): [] for p in PERCENTILES}
        for b in range(c):
            nz = np.flatnonzero(hist[b])
            if self.exact:
                n, mean, std, lo, hi = self._int_moments(hist[b], nz)
            else:
                n = int(self.count[b])
                mean = float(self.mean[b]) if n else None
                std = math.sqrt(self.m2[b] / n) if n else None
                lo = float(self.vmin[b]) if n else None
                hi = float(self.vmax[b]) if n else None
            counts.append(n)
            means.append(mean)
            stds.append(std)
            mins.append(lo)
            maxs.append(hi)
            nodata.append(float(1 - n / self.total[b]) if self.total[b] else None)
            values = self._percentiles(hist[b], nz, n, lo, hi) if n else [None] * len(PERCENTILES)
            for p, v in zip(PERCENTILES, values):
                pcts[_pct_key(p)].append(v)
        out.update(count=counts, mean=means, std=stds, min=mins, max=maxs, percentiles=pcts, nodata_fraction=nodata)
        if self.m.is_categorical:
            total = hist.sum(axis=0)
            out["class_histogram"] = {
                str(k + self.offset): int(total[k]) for k in np.nonzero(total)[0]
            }

    def _int_moments(self, h: np.ndarray, nz: np.ndarray):
        """(count, mean, std, min, max) of an exact histogram ``h`` whose non-empty bins are ``nz``."""
        n = int(h.sum())
        if n == 0:
            return 0, None, None, None, None
        vals = (nz + self.offset).astype(np.float64)
        w = h[nz].astype(np.float64)
        mean = float((vals * w).sum() / n)
        var = float((w * (vals - mean) ** 2).sum() / n)
        return n, mean, math.sqrt(var), float(vals[0]), float(vals[-1])

    def _percentiles(self, h: np.ndarray, nz: np.ndarray, n: int, lo: float | None,
                     hi: float | None) -> list[float]:
        """numpy's 'linear' percentiles (:data:`PERCENTILES`) of a band with ``n > 0`` valid values in the
        non-empty bins ``nz`` of ``h``: exact for integer bands, within one bucket for floats. Only the span of
        non-empty bins is summed."""
        first = int(nz[0])
        span = h[first: int(nz[-1]) + 1]
        cum = np.cumsum(span)
        rank = np.asarray(PERCENTILES, dtype=np.float64) / 100 * (n - 1)
        r0 = np.floor(rank).astype(np.int64)
        r1 = np.minimum(r0 + 1, n - 1)

        def value_at(r: np.ndarray) -> np.ndarray:
            i = np.searchsorted(cum, r, side="right")  # bin first + i holds the value of rank r
            if self.exact:
                return (i + first + self.offset).astype(np.float64)
            below = np.where(i > 0, cum[np.maximum(i - 1, 0)], 0)
            a, b = _bucket_edges(i + first)
            v = a + (b - a) * ((r - below + 0.5) / span[i])
            if lo is not None:
                v = np.where(lo > v, lo, v)
            if hi is not None:
                v = np.where(hi < v, hi, v)
            return v

        v0, v1 = value_at(r0), value_at(r1)
        return (v0 + (v1 - v0) * (rank - r0)).tolist()


class StatsSet:
    """Statistics of several modalities, per region; the global scope is the merge of the regions."""

    def __init__(self, modalities: Iterable[Modality]):
        self.modalities = {m.name: m for m in modalities}
        self.regions: dict[str, dict[str, ModalityStats]] = {}

    def add(self, region: str, modality: str, array: np.ndarray) -> None:
        scope = self.regions.setdefault(region, {})
        if modality not in scope:
            scope[modality] = ModalityStats(self.modalities[modality])
        scope[modality].add(array)

    def merge_state(self, region: str, states: Mapping[str, Mapping[str, Any]]) -> None:
        scope = self.regions.setdefault(region, {})
        for name, st in states.items():
            if name in scope:
                scope[name].merge_state(st)
                continue
            scope[name] = ModalityStats.from_state(self.modalities[name], st)

    def merge_counts(self, region: str, states: Mapping[str, Mapping[str, Any]]) -> None:
        """:meth:`ModalityStats.merge_counts` of each modality's state (see there)."""
        scope = self.regions.setdefault(region, {})
        for name, st in states.items():
            if name not in scope:
                scope[name] = ModalityStats(self.modalities[name])
            scope[name].merge_counts(st)

    def merge_moments(self, region: str, moments: Mapping[str, Sequence[Sequence[float]]]) -> None:
        """:meth:`ModalityStats.merge_moments` of each modality's (count, mean, m2), after its counts."""
        scope = self.regions[region]
        for name, (count, mean, m2) in moments.items():
            scope[name].merge_moments(count, mean, m2)

    def moments(self, states: Mapping[str, Mapping[str, Any]]) -> dict[str, list[list[float]]]:
        """The (count, mean, m2) of the float modalities among per-modality ``states``: what
        :meth:`merge_moments` takes (integer modalities have none)."""
        return {name: [st["count"], st["mean"], st["m2"]] for name, st in states.items()
                if not _exact_int(self.modalities[name].np_dtype)}

    def state(self, region: str) -> dict[str, Any]:
        return {name: s.state() for name, s in self.regions.get(region, {}).items()}

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``stats.json`` (its bytes: :func:`m3leo_stream.shard_format.dumps_stats`)."""
        out: dict[str, Any] = {}
        for name, m in self.modalities.items():
            per_region = {r: scope[name] for r, scope in sorted(self.regions.items()) if name in scope}
            if not per_region:
                continue
            glob = ModalityStats(m)
            for s in per_region.values():
                glob.merge(s)
            out[name] = {
                "bands": list(m.bands),
                "split": "train",
                "global": glob.summary(),
                "regions": {r: s.summary() for r, s in per_region.items()},
            }
        return out
