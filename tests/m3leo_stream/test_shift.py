"""Regional shift analysis on embeddings with known properties: a deliberate shift between regions is ranked first
with a confidence interval excluding zero while an unshifted pair's includes it; a shift that is only land-cover
composition disappears when chips are matched on land cover, and a real shift survives the matching; the entry
point writes its tables and figures (and a W&B offline run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from m3leo_stream import shift
from m3leo_stream.shift import CONFIG_DIR, Embeddings, ShiftSettings, analyze, load_embeddings, match, run

DIM = 16
LC = ["lc_tree_cover", "lc_grassland", "lc_cropland"]
# region -> (Dirichlet parameters of its land-cover composition, offset of its embeddings along a fixed direction)
SAME = (2.0, 2.0, 2.0)
REGIONS = {"conus": (SAME, 0.0), "europe": (SAME, 0.0), "china": (SAME, 0.8), "pakin": ((4.0, 2.0, 1.5), 0.0)}
FAST = ShiftSettings(n_boot=150, n_perm=50, seed=0, metrics=("mmd2", "domain_acc"))


def synthetic(regions: dict, n: int = 120, seed: int = 0) -> Embeddings:
    """Embeddings = the chip's land-cover fractions through one linear map shared by every region + unit noise +
    the region's offset: only ``china`` (offset) is shifted for its own sake; ``pakin`` differs only in land cover."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(len(LC), DIM)) * 2.0
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    xs, regs, lcs = [], [], []
    for r, (alpha, off) in regions.items():
        lc = rng.dirichlet(alpha, n)
        xs.append(lc @ w + rng.normal(size=(n, DIM)) + off * direction * np.sqrt(DIM) / 2)
        regs += [r] * n
        lcs.append(lc)
    terrain = rng.normal(size=(n * len(regions), 3)) * [100.0, 20.0, 3.0] + [300.0, 40.0, 5.0]
    return Embeddings(np.concatenate(xs), np.array(regs, dtype=object), np.concatenate(lcs), list(LC), terrain)


def write_parquet(emb: Embeddings, path: Path) -> Path:
    """The layout m3leo_stream.embed writes."""
    n = len(emb.x)
    cols = {"key": [f"k{i:05d}" for i in range(n)], "split": ["test"] * n, "region": list(emb.region),
            "lon": np.zeros(n), "lat": np.zeros(n)}
    for j, c in enumerate(emb.landcover_names):
        cols[c] = emb.landcover[:, j].astype(np.float32)
    for j, c in enumerate(("elev_mean", "elev_std", "slope_mean")):
        cols[c] = emb.terrain[:, j].astype(np.float32)
    arrays = {k: pa.array(v) for k, v in cols.items()}
    arrays["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.x.astype(np.float32).ravel()), DIM)
    pq.write_table(pa.table(arrays), path)
    return path


def rows_of(result: dict, control: str, metric: str) -> dict[tuple[str, str], dict]:
    return {tuple(sorted((r["region_a"], r["region_b"]))): r for r in result["pairs"]
            if r["control"] == control and r["metric"] == metric}


def test_mmd_unbiased_and_ties_left_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    k = shift.rbf_kernel(x, 1.5)
    a, b = np.arange(12), np.arange(12, 30)
    kaa, kbb = k[:12, :12], k[12:, 12:]
    want = ((kaa.sum() - np.trace(kaa)) / (12 * 11) + (kbb.sum() - np.trace(kbb)) / (18 * 17)
            - 2 * k[:12, 12:].mean())
    assert shift.mmd2_from_kernel(k, a, b) == pytest.approx(want)
    # a resample holding copies of one chip: the copies are not compared with each other
    dup = np.array([0, 0, 1, 2])
    assert shift.mmd2_from_kernel(k, dup, b) == pytest.approx(
        np.mean([k[dup[i], dup[j]] for i in range(4) for j in range(4) if dup[i] != dup[j]])
        + (kbb.sum() - np.trace(kbb)) / (18 * 17) - 2 * k[np.ix_(dup, b)].mean())


def test_match_respects_the_caliper():
    za = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    zb = np.array([[0.45, 0.55], [0.95, 0.05]])
    ia, ib = match(za, zb, None, None, 0.1, 1.0)
    assert sorted(zip(ia.tolist(), ib.tolist())) == [(0, 1), (1, 0)]  # chip 2 has no partner within 10 %


def test_known_shift_ranked_first_ci_excludes_zero_unshifted_includes_it():
    emb = synthetic({r: REGIONS[r] for r in ("conus", "europe", "china")})
    res = analyze(emb, FAST, controls=("none",))
    mmd = rows_of(res, "none", "mmd2")
    top = min(mmd.values(), key=lambda r: r["rank_mmd2"])
    assert "china" in (top["region_a"], top["region_b"])
    shifted, same = mmd[("china", "conus")], mmd[("conus", "europe")]
    assert shifted["ci_lo"] > 0 and shifted["significant"]
    assert same["ci_lo"] <= 0 <= same["ci_hi"] and not same["significant"]
    assert mmd[("conus", "europe")]["rank_mmd2"] == 3  # the unshifted pair ranks last
    assert shifted["p_value"] < 0.05 and same["p_value"] > 0.05
    acc = rows_of(res, "none", "domain_acc")
    assert acc[("china", "conus")]["ci_lo"] > 0.5
    assert acc[("conus", "europe")]["ci_lo"] <= 0.5 <= acc[("conus", "europe")]["ci_hi"]


def test_landcover_only_shift_removed_by_matching_on_land_cover():
    emb = synthetic({r: REGIONS[r] for r in ("conus", "pakin", "china")})
    res = analyze(emb, FAST, controls=("none", "landcover"), caliper_landcover=0.1)
    raw, matched = rows_of(res, "none", "mmd2"), rows_of(res, "landcover", "mmd2")
    lc_only = ("conus", "pakin")
    assert raw[lc_only]["significant"] and raw[lc_only]["ci_lo"] > 0  # uncontrolled: looks shifted
    assert matched[lc_only]["ci_lo"] <= 0 <= matched[lc_only]["ci_hi"]  # matched on land cover: gone
    assert matched[lc_only]["n_a"] >= 20
    real = ("china", "conus")
    assert matched[real]["significant"] and matched[real]["ci_lo"] > 0  # a real shift survives the control


def test_entry_point_writes_tables_figures_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_parquet(synthetic(REGIONS, n=40), tmp_path / "embeddings.parquet")
    emb = load_embeddings(str(path))
    assert emb.x.shape == (160, DIM) and emb.landcover.shape == (160, 3) and emb.terrain.shape == (160, 3)
    out = tmp_path / "shift"
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("shift", [f"input={path}", f"out={out}", "n_boot=20", "n_perm=10", "logger=wandb",
                                "controls=[none,landcover_terrain]", "caliper.landcover=0.2", "caliper.terrain=0.5",
                                "min_chips=5", "cv_folds=3", "pca_dim=4"])
    res = run(cfg)
    rows = list(csv_rows(out / "pairs.csv"))
    assert {r["control"] for r in rows} == {"none", "landcover_terrain"}
    assert {r["metric"] for r in rows} == {"mmd2", "frechet", "domain_acc"}
    assert len(rows) == 2 * 6 * 3
    probes = list(csv_rows(out / "probes.csv"))
    assert {p["region"] for p in probes} == set(REGIONS)
    assert all(np.isfinite(float(p["r2_in_region"])) for p in probes)
    for name in ("heatmap_mmd2_none.png", "heatmap_domain_acc_landcover_terrain.png",
                 "heatmap_frechet_landcover_terrain.png", "pca_regions.png"):
        assert (out / name).stat().st_size > 1000, name
    doc = json.loads((out / "shift.json").read_text())
    assert doc["bandwidth_rule"].startswith("median") and len(doc["pairs"]) == len(rows)
    assert res["files"]["wandb"] and any(Path(res["files"]["wandb"]).glob("**/*.wandb"))


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)
