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


@pytest.mark.parametrize("name", ["s1grd", "esawc", "gssic", "biomass"])
def test_summary_matches_numpy_over_valid_pixels(name):
    """count/mean/std/min/max and every percentile against numpy over the valid pixels of several chips: exact for
    integer bands, within one float bucket (2**-7 relative) for float bands; a band with no valid pixel has
    None."""
    from m3leo_stream.modalities import REGISTRY
    from shard_tools.stats import PERCENTILES, ModalityStats, _pct_key

    m = REGISTRY[name]
    rng = np.random.default_rng(1)
    c, h, w = len(m.bands), 20, 30
    chips = []
    for i in range(3):
        if m.np_dtype.kind == "f":
            a = rng.normal(5.0, 3.0, size=(c, h, w)).astype(m.np_dtype)
            a[:, ::5, ::3] = np.nan
        else:
            info = np.iinfo(m.np_dtype)
            a = rng.integers(max(info.min + 1, -300), min(info.max, 200), size=(c, h, w), endpoint=True,
                             dtype=m.np_dtype)
            if m.nodata is not None:
                a[:, ::4, ::7] = m.nodata
        if c > 1 and i == 0:  # one band fully invalid in one chip, fully valid in the others
            a[-1] = m.nodata if m.nodata is not None and m.np_dtype.kind != "f" else np.nan
        chips.append(a)
    st = ModalityStats(m)
    for a in chips:
        st.add(a)
    out = st.summary()
    both = np.concatenate([a.reshape(c, -1) for a in chips], axis=1)
    for b in range(c):
        v = both[b]
        v = v[~m.is_nodata(v)].astype(np.float64)
        assert out["count"][b] == v.size
        assert out["mean"][b] == pytest.approx(v.mean(), rel=1e-12)
        assert out["std"][b] == pytest.approx(v.std(), rel=1e-9)
        assert out["min"][b] == v.min() and out["max"][b] == v.max()
        for p in PERCENTILES:
            want = np.percentile(v, p)
            got = out["percentiles"][_pct_key(p)][b]
            if m.np_dtype.kind == "f":
                assert got == pytest.approx(want, rel=2 ** -7, abs=1e-6), (b, p)
            else:
                assert got == want, (b, p)
    empty = ModalityStats(m)
    empty.add(np.full((c, 2, 2), np.nan if m.np_dtype.kind == "f" else m.nodata, dtype=m.np_dtype))
    if m.nodata is not None or m.np_dtype.kind == "f":
        e = empty.summary()
        assert e["count"] == [0] * c and e["mean"] == [None] * c
        assert all(e["percentiles"][_pct_key(p)] == [None] * c for p in PERCENTILES)
