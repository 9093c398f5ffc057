"""Exact 8/16-bit histograms: every counting path gives numpy's plain bincount."""

from __future__ import annotations

import numpy as np
import pytest

from shard_tools.stats import _add_exact_histogram


def _cases(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    spans = [(info.min, info.max), (info.min, info.min + 100), (info.max - 100, info.max),
             (info.min, info.min + 32767), (info.max - 32767, info.max), (0, min(info.max, 32767)),
             (max(info.min, -5), 5), (info.min, info.min), (info.max, info.max)]
    for lo, hi in spans:
        lo, hi = max(lo, info.min), min(hi, info.max)
        yield rng.integers(lo, hi, size=(3, 999), dtype=dtype, endpoint=True)
    mixed = rng.integers(-40, 10, size=(2, 500)).astype(dtype) if info.min < 0 else None
    if mixed is not None:  # nodata at the type's minimum beside small values: too wide for the short path
        mixed[:, ::7] = info.min
        yield mixed


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_histogram_paths_equal_bincount(dtype):
    info = np.iinfo(dtype)
    for a in _cases(dtype):
        hist = np.zeros((a.shape[0], 1 << (8 * a.itemsize)), np.int64)
        _add_exact_histogram(hist, a)
        _add_exact_histogram(hist, a[:, ::-1])  # non-contiguous input, accumulated
        want = 2 * np.stack([np.bincount(b.astype(np.int64) - info.min, minlength=hist.shape[1]) for b in a])
        np.testing.assert_array_equal(hist, want, err_msg=f"{a.dtype} {a.min()}..{a.max()}")
