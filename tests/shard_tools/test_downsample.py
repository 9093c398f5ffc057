"""Block reduction of a modality below its canonical size (``shard_tools.downsample``): each band kind's rule on
hand-computed blocks, nodata and NaN, ties, phase wrap-around, and the vectorised code against a plain loop."""

from __future__ import annotations

import math
import zlib
from collections import Counter

import numpy as np
import pytest

from m3leo_stream.modalities import REGISTRY, Modality
from shard_tools.downsample import (
    allowed_sizes,
    block_reduce,
    check_resolutions,
    parse_resolutions,
    provenance,
    reduced,
)


def _mod(kind: str, dtype: str, nodata, bands: int = 1, **kw) -> Modality:
    return Modality(name=f"t_{kind}", folder_pattern="t", file_ext="tif", bands=tuple(f"b{i}" for i in range(bands)),
                    dtype=dtype, kind=kind, resolution_m=10.0, description="", source="", nodata=nodata, **kw)


def _grid(blocks: list[list[list[float]]], dtype) -> np.ndarray:
    """A (1, 2f, 2f) array from the raster-order pixels of its four f×f blocks [[TL, TR], [BL, BR]]."""
    rows = []
    for block_row in blocks:
        f = math.isqrt(len(block_row[0]))
        rows.append(np.concatenate([np.asarray(b, np.float64).reshape(f, f) for b in block_row], axis=1))
    return np.concatenate(rows, axis=0)[None].astype(dtype)


def test_optical_mean_over_valid_pixels_rounds_half_to_even():
    m = _mod("optical", "uint8", 0)
    a = _grid([[[10, 20, 30, 0], [0, 0, 0, 0]],
               [[1, 2, 0, 0], [2, 3, 0, 0]]], np.uint8)
    out = block_reduce(m, a, 2)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2)
    # (10+20+30)/3 = 20, no valid pixel -> nodata 0; 1.5 -> 2 and 2.5 -> 2 (half to even)
    assert out[0].tolist() == [[20, 0], [2, 2]]


def test_sar_db_averages_linear_power_not_db():
    m = _mod("sar_db", "int16", -32768, scale=(0.01,))
    nd = -32768
    a = _grid([[[0, -2000, nd, nd], [-1000, -1000, -1000, -1000]],
               [[nd, nd, nd, nd], [-1500, nd, nd, nd]]], np.int16)
    out = block_reduce(m, a, 2)
    # 0 dB and -20 dB: power (1 + 0.01) / 2 = 0.505 -> 10 log10(0.505) = -2.9671 dB -> -297 (a dB mean: -1000)
    assert 10 * math.log10(0.505) == pytest.approx(-2.96709, abs=1e-5)
    assert out[0].tolist() == [[-297, -1000], [nd, -1500]]


def test_continuous_float_mean_skips_nan_and_keeps_float32():
    m = _mod("continuous", "float32", float("nan"))
    nan = np.nan
    a = _grid([[[1, 2, nan, 4], [nan] * 4], [[0.1, 0.2, 0.3, 0.4], [5, nan, nan, nan]]], np.float32)
    out = block_reduce(m, a, 2)
    assert out.dtype == np.float32
    assert out[0, 0, 0] == np.float32(7 / 3)
    assert np.isnan(out[0, 0, 1])
    want = (float(np.float32(0.1)) + float(np.float32(0.2)) + float(np.float32(0.3)) + float(np.float32(0.4))) / 4
    assert out[0, 1, 0] == np.float32(want)
    assert out[0, 1, 1] == 5


def test_integer_continuous_with_a_nonzero_nodata_is_exact():
    m = _mod("continuous", "int16", -32768)
    nd = -32768
    a = _grid([[[100, nd, nd, 103], [nd] * 4], [[-5, -6, -7, -8], [7, 7, 7, nd]]], np.int16)
    assert block_reduce(m, a, 2)[0].tolist() == [[102, nd], [-6, 7]]  # 101.5 -> 102, -6.5 -> -6


def test_categorical_mode_ties_to_smallest_code_and_nodata_when_empty():
    m = _mod("categorical", "uint8", 0, class_codes=(10, 20, 30, 40))
    a = _grid([[[10, 20, 20, 0], [30, 10, 30, 10]], [[0, 0, 0, 0], [40, 0, 0, 0]]], np.uint8)
    assert block_reduce(m, a, 2)[0].tolist() == [[20, 10], [0, 40]]
    # 3x3 blocks: 30 three times beats 10 and 20 twice; nodata pixels never win however many
    b = _grid([[[10, 10, 20, 20, 30, 30, 30, 0, 0], [0, 0, 0, 0, 0, 0, 0, 20, 10]],
               [[0] * 9, [40] * 9]], np.uint8)
    assert block_reduce(m, b, 3)[0].tolist() == [[30, 10], [0, 40]]


def test_phase_circular_mean_across_the_wrap():
    m = _mod("phase", "float32", float("nan"))
    nan = np.nan
    a = _grid([[[3.1, -3.1, 3.1, -3.1], [-3.1, 3.1, -3.1, 3.1]],
               [[10.0, 10.2, 10.4, 10.2], [nan, 3.0, -3.0, nan]]], np.float32)
    out = block_reduce(m, a, 2)[0].astype(np.float64)
    # values near +-pi average to +-pi (at the level of the block's first valid pixel), never to 0
    assert out[0, 0] == pytest.approx(math.pi, abs=1e-5)
    assert out[0, 1] == pytest.approx(-math.pi, abs=1e-5)
    # unwrapped phase stays unwrapped: the circular mean of 10.0, 10.2, 10.4, 10.2 is 10.2, not 10.2 - 4 pi
    assert out[1, 0] == pytest.approx(10.2, abs=1e-5)
    assert out[1, 1] == pytest.approx(math.pi, abs=1e-5)  # NaN left out; 3.0 and -3.0 meet at pi
    allnan = block_reduce(m, np.full((1, 2, 2), np.nan, np.float32), 2)
    assert np.isnan(allnan).all()


def test_special_codes_win_only_by_majority():
    m = _mod("continuous", "uint8", 253, special_values={200: "water"})
    a = _grid([[[200, 200, 200, 50], [200, 200, 50, 60]], [[200, 253, 253, 253], [50, 51, 253, 200]]], np.uint8)
    # 3 water vs 1 -> water; 2 vs 2 -> mean 55; water alone -> water; 50, 51 beat 1 water -> 50.5 -> 50
    assert block_reduce(m, a, 2)[0].tolist() == [[200, 55], [200, 50]]


def test_a_mean_on_a_reserved_value_is_an_error_not_a_silent_nodata():
    m = _mod("continuous", "uint8", 5)
    with pytest.raises(ValueError, match="reserved for nodata"):
        block_reduce(m, np.array([[[4, 6], [4, 6]]], np.uint8), 2)


def test_mixed_band_kinds_follow_each_band():
    m = REGISTRY["gunw"]  # amplitude: continuous, coherence: coherence, unwrappedPhase: phase
    a = np.zeros((3, 2, 2), np.float32)
    a[0] = a[1] = [[3.1, -3.1], [3.1, -3.1]]
    a[2] = a[0]
    out = block_reduce(m, a, 2)[:, 0, 0]
    assert out[0] == pytest.approx(0.0, abs=1e-6) and out[1] == pytest.approx(0.0, abs=1e-6)  # plain means
    assert abs(out[2]) == pytest.approx(math.pi, abs=1e-5)  # circular


# ------------------------------------------------------------------ against a plain per-block loop


def _reference(m: Modality, a: np.ndarray, f: int) -> np.ndarray:
    c, h, w = a.shape
    out = np.empty((c, h // f, w // f), a.dtype)
    valid = ~m.is_nodata(a)
    special = set(m.special_values)
    for b in range(c):
        kind = "categorical" if m.is_categorical else m.band_kinds[b]
        for y in range(h // f):
            for x in range(w // f):
                vals = a[b, y * f:(y + 1) * f, x * f:(x + 1) * f].ravel().tolist()
                ok = valid[b, y * f:(y + 1) * f, x * f:(x + 1) * f].ravel().tolist()
                good = [v for v, k in zip(vals, ok) if k]
                if kind == "categorical":
                    if not good:
                        out[b, y, x] = m.nodata
                        continue
                    n = Counter(good)
                    out[b, y, x] = min(n, key=lambda v: (-n[v], v))
                    continue
                spec = Counter(v for v in good if v in special)
                plain = [v for v in good if v not in special]
                if spec and max(spec.values()) > len(plain):
                    out[b, y, x] = min(spec, key=lambda v: (-spec[v], v))
                    continue
                if not plain:
                    out[b, y, x] = m.nodata
                    continue
                if kind == "sar_db":
                    sc = m.scale[b]
                    p = np.power(10.0, np.asarray(plain, np.float64) * (sc / 10.0))
                    total = 0.0
                    for v in p.tolist():
                        total += v
                    r = 10.0 * math.log10(total / len(plain)) / sc
                elif kind == "phase":
                    first = plain[0]
                    d = np.asarray(plain, np.float64) - first
                    r = first + math.atan2(float(np.sin(d).sum()), float(np.cos(d).sum()))
                else:
                    total = 0.0
                    for v in plain:
                        total += float(v)
                    r = total / len(plain)
                out[b, y, x] = np.rint(r) if a.dtype.kind in "iu" else r
    return out


def _random_member(m: Modality, rng: np.random.Generator, side: int, empty: int = 2) -> np.ndarray:
    c = len(m.bands)
    if m.is_categorical:
        a = rng.choice(np.asarray(m.class_codes), (c, side, side)).astype(m.np_dtype)
    elif m.name == "s1grd":
        a = rng.integers(-3000, 500, (c, side, side)).astype(np.int16)
    elif m.name == "gunw":
        a = rng.uniform(-4, 4, (c, side, side)).astype(np.float32)
    elif m.np_dtype.kind == "f":
        a = rng.uniform(0, 100, (c, side, side)).astype(np.float32)
        a[m.band_index(["geometry_lsmap"]) if "geometry_lsmap" in m.bands else []] = rng.integers(0, 3, (side, side))
    else:
        a = rng.integers(1, 101, (c, side, side)).astype(m.np_dtype)
        for code in m.special_values:
            a[rng.random(a.shape) < 0.4] = code
    hole = rng.random(a.shape) < 0.3
    hole[:, :empty, :empty] = True  # a block without any valid pixel
    a[hole] = m.nodata
    return a


@pytest.mark.parametrize("name,side,factor", [("s1grd", 12, 2), ("s1grd", 12, 3), ("s2rgbm", 12, 4),
                                              ("esawc", 12, 2), ("esawc", 12, 3), ("gssic", 10, 5), ("gunw", 10, 2),
                                              ("modisveg", 12, 2), ("srtmdem", 8, 4), ("biomass", 9, 3)])
def test_vectorised_reduction_equals_a_plain_loop(name, side, factor):
    m = REGISTRY[name]
    a = _random_member(m, np.random.default_rng(zlib.crc32(name.encode()) + factor), side, factor)
    got, want = block_reduce(m, a, factor), _reference(m, a, factor)
    assert got.dtype == a.dtype and got.shape == want.shape
    if name == "gunw":  # sin/cos of whole arrays and of scalars may differ in the last bit
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)
    assert m.is_nodata(got[:, 0, 0]).all()  # the empty block


def test_uniform_blocks_are_kept_exactly():
    for name in ("s1grd", "s2rgbm", "esawc", "srtmdem"):
        m = REGISTRY[name]
        small = _random_member(m, np.random.default_rng(1), 8)
        big = small.repeat(4, axis=1).repeat(4, axis=2)
        np.testing.assert_array_equal(block_reduce(m, big, 4), small)


# ------------------------------------------------------------------ options


def test_resolutions_are_checked_against_the_registry():
    assert allowed_sizes(448)[:6] == [448, 224, 112, 64, 56, 32]
    assert allowed_sizes(50) == [50, 25, 10, 5, 2, 1]
    assert parse_resolutions(["s1grd=224", " s2rgbm = 112 "]) == {"s1grd": 224, "s2rgbm": 112}
    assert check_resolutions({"s1grd": 224, "s2rgbm": 448}, REGISTRY) == {"s1grd": 224}  # factor 1: as is
    for bad, msg in ((["s1grd"], "expects MODALITY=PX"), (["s1grd=2x"], "not a whole number"),
                     (["s1grd=1", "s1grd=2"], "given twice")):
        with pytest.raises(ValueError, match=msg):
            parse_resolutions(bad)
    allowed = "allowed sizes: 448, 224, 112, 64, 56, 32, 28, 16, 14, 8, 7, 4, 2, 1"
    for res, msg in (({"s1grd": 300}, f"s1grd=300: 448 px .* is not a whole multiple of 300; {allowed}$"),
                     ({"s1grd": 896}, f"s1grd=896: 896 px would upsample s1grd .*; {allowed}$"),
                     ({"gssic": 20}, "allowed sizes: 50, 25, 10, 5, 2, 1$"),
                     ({"s1grd": 0}, "positive whole number"),
                     ({"nope": 2}, "unknown modality 'nope'")):
        with pytest.raises(ValueError, match=msg):
            check_resolutions(res, REGISTRY)
    with pytest.raises(ValueError, match="s1grd is not among the modalities built"):
        check_resolutions({"s1grd": 224}, REGISTRY, ["s2rgbm"])


def test_reduced_entry_has_the_stored_shape_and_round_trips():
    m = reduced(REGISTRY["s1grd"], 224)
    assert m.shape == (16, 224, 224) and m.resolution_m == 20.0
    assert Modality.from_json(m.to_json()).to_json() == m.to_json()  # (NaN nodata: compare the json)
    g = reduced(REGISTRY["gssic"], 25)
    assert g.canonical_px == 25 and Modality.from_json(g.to_json()).shape == (38, 25, 25)
    p = provenance(REGISTRY["gssic"], 25)
    assert p["from_px"] == 50 and p["factor"] == 2 and set(p["rules"]) == {"continuous", "coherence", "categorical"}
