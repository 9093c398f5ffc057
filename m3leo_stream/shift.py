"""Regional distribution shift of embeddings: ``python -m m3leo_stream.shift input=<embeddings.parquet> [overrides]``.

Reads the Parquet of ``m3leo_stream.embed`` (or any table with ``region`` and a fixed-size-list ``embedding``
column, optionally ``lc_*`` land-cover fractions and ``elev_mean``/``elev_std``/``slope_mean``) and, for every pair
of regions, measures how far apart their embedding distributions are:

- ``mmd2``: squared maximum mean discrepancy, unbiased U-statistic (Gretton et al. 2012) with a Gaussian RBF kernel
  ``k(x, y) = exp(-||x - y||² / (2σ²))`` whose bandwidth ``σ`` is the median heuristic: the median Euclidean
  distance between the pooled chips of the pair. 0 when the distributions are equal (the estimate can be negative).
- ``frechet``: Fréchet distance between Gaussians fitted to the two sets (the FID formula),
  ``||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½)``, on the first ``pca_dim`` principal components of all chips. Biased
  upwards at finite n, so its null reference is the mean over label permutations, and its decision the
  permutation p-value.
- ``domain_acc``: balanced accuracy of a logistic-regression domain classifier (standardised ``pca_dim``
  components), ``cv_folds``-fold stratified cross-validation; chance is 0.5.

Every metric has a percentile bootstrap confidence interval (``n_boot`` resamples of the chips within each region;
for ``mmd2`` the U-statistic leaves out pairs of copies of the same chip, so resampling does not bias it; for
``domain_acc`` the out-of-fold predictions are resampled) and a permutation p-value (``n_perm`` shuffles of the
region labels; ``domain_acc``: none). A pair is shifted (``significant``) when the interval excludes the null value
(0 for ``mmd2``, 0.5 for ``domain_acc``), and for ``frechet`` when p < ``alpha``.

Controls (``controls``): the same metrics on chips matched on land cover and/or terrain. For each pair, optimal 1:1
matching (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) minimises the summed covariate distance and
keeps only matched pairs within a caliper: land cover by the total-variation distance between the chips' class
fractions (½ L1; ``caliper.landcover``, e.g. 0.1 = at most 10 % of the area in different classes), terrain by the
RMS difference of the z-scored ``elev_mean``, ``elev_std``, ``slope_mean`` (``caliper.terrain`` in standard
deviations), ``landcover_terrain`` by both calipers. The matched sets have the same covariate distribution, so what
shift remains is not explained by it.

Leave-one-region-out linear probes (``probe.target``: ``landcover`` = all ``lc_*`` fractions, or any numeric
column): ridge regression (``RidgeCV``) trained on all other regions and scored (R²) on the held-out region, next to
the R² of ``cv_folds``-fold cross-validation inside that region; the gap is what the shift costs a downstream user.

Writes to ``out``: ``shift.json`` (everything), ``pairs.csv`` (one row per control × pair × metric, with the rank
of the pair by ``mmd2`` within its control), ``probes.csv``, ``heatmap_<metric>_<control>.png`` and
``pca_regions.png`` (chips on the first two principal components, coloured by region); with a logger configured
(``logger=wandb``) the tables and images also go to W&B (offline unless an API key is configured). Configs:
``m3leo_stream/configs/shift.yaml``.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from m3leo_stream.configs import CONFIG_DIR

log = logging.getLogger("m3leo_stream.shift")

Control = Literal["none", "landcover", "terrain", "landcover_terrain"]
Metric = Literal["mmd2", "frechet", "domain_acc"]
METRICS: tuple[str, ...] = get_args(Metric)
TERRAIN = ("elev_mean", "elev_std", "slope_mean")
NULL_VALUE = {"mmd2": 0.0, "domain_acc": 0.5}


@dataclass
class Embeddings:
    """Embeddings (N, D) with their regions and, where known, land-cover fractions and terrain summaries."""

    x: np.ndarray
    region: np.ndarray
    landcover: np.ndarray | None = None  # (N, K) fractions, NaN rows where unknown
    landcover_names: list[str] = field(default_factory=list)
    terrain: np.ndarray | None = None  # (N, 3), NaN where unknown
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # other numeric columns (probe targets)

    @property
    def regions(self) -> list[str]:
        return sorted(set(self.region.tolist()))


def load_embeddings(path: str, splits: Sequence[str] | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> Embeddings:
    """Read an embeddings Parquet (file, directory or fsspec URL), optionally only some splits."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from m3leo_stream.storage import get_fs

    fs, p = get_fs(path, dict(storage_options or {}))
    table = pq.read_table(p, filesystem=fs)
    if splits and "split" in table.column_names:
        table = table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(splits))))
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows (splits {splits})")
    emb = table.column("embedding").combine_chunks()
    x = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).reshape(table.num_rows, -1)
    region = np.asarray(table.column("region").to_pylist(), dtype=object)
    lc_names = [c for c in table.column_names if c.startswith("lc_") and c != "lc_valid_share"]
    lc = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in lc_names], 1) \
        if lc_names else None
    tr = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in TERRAIN], 1) \
        if all(c in table.column_names for c in TERRAIN) else None
    cols = {}
    for c in table.column_names:
        t = table.schema.field(c).type
        if c not in ("embedding",) and (str(t).startswith(("float", "double", "int"))):
            cols[c] = table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
    return Embeddings(x, region, lc, lc_names, tr, cols)


# --- metrics ---------------------------------------------------------------------------------------------------------

def median_bandwidth(x: np.ndarray) -> float:
    """Median heuristic: the median Euclidean distance between distinct points of ``x``."""
    from scipy.spatial.distance import pdist

    d = pdist(x)
    med = float(np.median(d[d > 0])) if (d > 0).any() else 1.0
    return med


def rbf_kernel(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian RBF kernel matrix ``exp(-||x_i - x_j||² / (2σ²))``."""
    from sklearn.metrics.pairwise import rbf_kernel as _rbf

    return _rbf(x, gamma=1.0 / (2.0 * sigma * sigma))


def mmd2_from_kernel(k: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> float:
    """Unbiased MMD² of the points ``ia`` vs ``ib`` of a pooled kernel matrix; within-set terms average over pairs
    of distinct source points (so bootstrap copies of one chip are not compared with themselves)."""
    kaa = k[np.ix_(ia, ia)]
    kbb = k[np.ix_(ib, ib)]
    ma = ia[:, None] != ia[None, :]
    mb = ib[:, None] != ib[None, :]
    return float(kaa[ma].mean() + kbb[mb].mean() - 2.0 * k[np.ix_(ia, ib)].mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to ``a`` and ``b`` (rows = points)."""
    from scipy.linalg import sqrtm

    mu = a.mean(0) - b.mean(0)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    eps = 1e-6 * np.eye(len(ca))  # as pytorch-fid: keeps the product's square root defined for rank-deficient sets
    covmean = sqrtm((ca + eps) @ (cb + eps))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2.0 * np.trace(covmean))


def _classifier(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))


def domain_predictions(a: np.ndarray, b: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, out-of-fold predictions) of the domain classifier a (0) vs b (1)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = np.concatenate([a, b])
    y = np.r_[np.zeros(len(a), int), np.ones(len(b), int)]
    k = max(2, min(folds, len(a), len(b)))
    cv = StratifiedKFold(k, shuffle=True, random_state=seed)
    return y, cross_val_predict(_classifier(seed), x, y, cv=cv)


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean per-class recall of labels 0/1 (what ``sklearn.metrics.balanced_accuracy_score`` gives, without its
    per-call validation: it runs once per bootstrap resample)."""
    return float(np.mean([(p[y == c] == c).mean() for c in (0, 1) if (y == c).any()]))


def _ci(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class ShiftSettings:
    """How the pair metrics are computed (see the module docstring)."""

    n_boot: int = 200
    n_perm: int = 200
    level: float = 0.95
    alpha: float = 0.05
    pca_dim: int | None = 32
    cv_folds: int = 5
    max_per_region: int | None = 1000
    min_chips: int = 10
    seed: int = 0
    metrics: tuple[str, ...] = METRICS


def pair_metrics(a: np.ndarray, b: np.ndarray, a_low: np.ndarray, b_low: np.ndarray, s: ShiftSettings,
                 rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """All metrics of one pair: ``a``/``b`` full embeddings (MMD), ``a_low``/``b_low`` PCA projections (Fréchet,
    classifier). Each: value, ci_lo, ci_hi, null, p_value, significant."""
    na, nb = len(a), len(b)
    out: dict[str, dict[str, Any]] = {}
    ia0, ib0 = np.arange(na), np.arange(na, na + nb)

    def boot_idx() -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, na, na), na + rng.integers(0, nb, nb)

    if "mmd2" in s.metrics:
        pooled = np.concatenate([a, b])
        sigma = median_bandwidth(pooled)
        k = rbf_kernel(pooled, sigma)
        value = mmd2_from_kernel(k, ia0, ib0)
        boots = np.array([mmd2_from_kernel(k, *boot_idx()) for _ in range(s.n_boot)])
        null = np.array([mmd2_from_kernel(k, perm[:na], perm[na:])
                         for perm in (rng.permutation(na + nb) for _ in range(s.n_perm))])
        lo, hi = _ci(boots, s.level)
        out["mmd2"] = {"value": value, "ci_lo": lo, "ci_hi": hi, "null": 0.0, "bandwidth": sigma,
                       "p_value": float((1 + (null >= value).sum()) / (1 + len(null))),
                       "significant": bool(lo > 0.0 or hi < 0.0)}
    if "frechet" in s.metrics:
        value = frechet_distance(a_low, b_low)
        pooled = np.concatenate([a_low, b_low])
        fboots: list[float] = []
        for _ in range(s.n_boot):
            ia, ib = boot_idx()
            fboots.append(frechet_distance(pooled[ia], pooled[ib]))
        perms: list[float] = []
        for _ in range(s.n_perm):
            perm = rng.permutation(na + nb)
            perms.append(frechet_distance(pooled[perm[:na]], pooled[perm[na:]]))
        lo, hi = _ci(np.array(fboots), s.level)
        p = float((1 + (np.array(perms) >= value).sum()) / (1 + len(perms)))
        out["frechet"] = {"value": value, "ci_lo": lo, "ci_hi": hi, "null": float(np.mean(perms)), "p_value": p,
                          "significant": bool(p < s.alpha)}
    if "domain_acc" in s.metrics:
        y, pred = domain_predictions(a_low, b_low, s.cv_folds, s.seed)
        value = balanced_accuracy(y, pred)
        ia_, ib_ = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
        aboots: list[float] = []
        for _ in range(s.n_boot):
            idx = np.concatenate([rng.choice(ia_, len(ia_)), rng.choice(ib_, len(ib_))])
            aboots.append(balanced_accuracy(y[idx], pred[idx]))
        lo, hi = _ci(np.array(aboots), s.level)
        out["domain_acc"] = {"value": value, "ci_lo": lo, "ci_hi": hi, "null": 0.5, "p_value": None,
                             "significant": bool(lo > 0.5)}
    return out


# --- matching ---------------------------------------------------------------------------------------------------

def match(za: np.ndarray | None, zb: np.ndarray | None, ta: np.ndarray | None, tb: np.ndarray | None,
          caliper_landcover: float, caliper_terrain: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into a and b) of optimally 1:1-matched chips within the calipers: land-cover fractions ``za``/``zb``
    by total-variation distance, z-scored terrain ``ta``/``tb`` by RMS difference; with both, a pair must be within
    both calipers (cost: the larger of the two distances, each relative to its caliper)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    costs = []
    if za is not None:
        costs.append(0.5 * cdist(za, zb, "cityblock") / caliper_landcover)
    if ta is not None:
        costs.append(cdist(ta, tb, "euclidean") / math.sqrt(ta.shape[1]) / caliper_terrain)
    if not costs:
        raise ValueError("match: no covariates")
    cost = np.maximum.reduce(costs)
    ra, rb = linear_sum_assignment(np.minimum(cost, 1e6))
    keep = cost[ra, rb] <= 1.0
    return ra[keep], rb[keep]


# --- the analysis --------------------------------------------------------------------------------------------------

def _subsample(idx: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or len(idx) <= n:
        return idx
    return np.sort(rng.choice(idx, n, replace=False))


def _covariates(emb: Embeddings, control: str) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(land cover, z-scored terrain, rows having what the control needs)."""
    ok = np.ones(len(emb.x), bool)
    lc = tr = None
    if control in ("landcover", "landcover_terrain"):
        if emb.landcover is None:
            raise ValueError(f"control {control!r}: the embeddings have no lc_* land-cover columns")
        lc = emb.landcover
        ok &= np.isfinite(lc).all(1)
    if control in ("terrain", "landcover_terrain"):
        if emb.terrain is None:
            raise ValueError(f"control {control!r}: the embeddings have no {', '.join(TERRAIN)} columns")
        t = emb.terrain
        fin = np.isfinite(t).all(1)
        mu, sd = t[fin].mean(0), t[fin].std(0)
        tr = (t - mu) / np.where(sd > 0, sd, 1.0)
        ok &= fin
    return lc, tr, ok


def analyze(emb: Embeddings, settings: ShiftSettings = ShiftSettings(),
            controls: Sequence[Control] = ("none", "landcover"), caliper_landcover: float = 0.1,
            caliper_terrain: float = 0.25, regions: Sequence[str] | None = None) -> dict[str, Any]:
    """Pair metrics per control; returns ``{"pairs": [rows], "bandwidth_rule": ..., ...}`` (rows as in pairs.csv)."""
    from sklearn.decomposition import PCA

    for c in controls:
        if c not in get_args(Control):
            raise ValueError(f"control must be one of {get_args(Control)}, not {c!r}")
    rng = np.random.default_rng(settings.seed)
    names = list(regions) if regions else emb.regions
    keep = {r: _subsample(np.flatnonzero(emb.region == r), settings.max_per_region, rng) for r in names}
    allrows = np.concatenate(list(keep.values()))
    k = min(settings.pca_dim or emb.x.shape[1], emb.x.shape[1], len(allrows) - 1)
    pca = PCA(k, random_state=settings.seed).fit(emb.x[allrows])
    low = pca.transform(emb.x)
    rows: list[dict[str, Any]] = []
    for control in controls:
        lc, tr, ok = _covariates(emb, control) if control != "none" else (None, None, np.ones(len(emb.x), bool))
        for ra, rb in itertools.combinations(names, 2):
            ia, ib = keep[ra][ok[keep[ra]]], keep[rb][ok[keep[rb]]]
            n_before = (len(ia), len(ib))
            if control != "none":
                ma, mb = match(lc[ia] if lc is not None else None, lc[ib] if lc is not None else None,
                               tr[ia] if tr is not None else None, tr[ib] if tr is not None else None,
                               caliper_landcover, caliper_terrain)
                ia, ib = ia[ma], ib[mb]
            base = {"control": control, "region_a": ra, "region_b": rb, "n_a": int(len(ia)), "n_b": int(len(ib)),
                    "n_a_available": int(n_before[0]), "n_b_available": int(n_before[1])}
            if min(len(ia), len(ib)) < settings.min_chips:
                log.warning("%s %s–%s: %d/%d chips (matched) < min_chips=%d: skipped", control, ra, rb, len(ia),
                            len(ib), settings.min_chips)
                for m in settings.metrics:
                    rows.append({**base, "metric": m, "value": math.nan, "ci_lo": math.nan, "ci_hi": math.nan,
                                 "null": NULL_VALUE.get(m, math.nan), "p_value": None, "significant": None})
                continue
            res = pair_metrics(emb.x[ia], emb.x[ib], low[ia], low[ib], settings, rng)
            for m, r in res.items():
                rows.append({**base, "metric": m, **r})
            log.info("%s %s–%s (%d, %d): %s", control, ra, rb, len(ia), len(ib),
                     ", ".join(f"{m} {r['value']:.4g} [{r['ci_lo']:.4g}, {r['ci_hi']:.4g}]" for m, r in res.items()))
    for control in controls:  # rank the pairs of each control by MMD² (1 = most shifted)
        mm = [r for r in rows if r["control"] == control and r["metric"] == "mmd2" and np.isfinite(r["value"])]
        order = {(r["region_a"], r["region_b"]): i + 1 for i, r in
                 enumerate(sorted(mm, key=lambda r: r["value"], reverse=True))}
        for r in rows:
            if r["control"] == control:
                r["rank_mmd2"] = order.get((r["region_a"], r["region_b"]))
    return {"pairs": rows, "regions": names, "pca_dim": int(k),
            "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
            "bandwidth_rule": "median pairwise Euclidean distance of the pooled pair (median heuristic)",
            "kernel": "Gaussian RBF exp(-||x-y||^2 / (2 sigma^2))", "settings": settings.__dict__,
            "controls": list(controls), "caliper": {"landcover": caliper_landcover, "terrain": caliper_terrain},
            "samples": {r: int(len(v)) for r, v in keep.items()}, "_pca": pca, "_keep": keep}


def probe_target(emb: Embeddings, target: str) -> tuple[np.ndarray, list[str]]:
    """(N, T) probe target: ``landcover`` = the lc_* fractions, else one numeric column."""
    if target == "landcover":
        if emb.landcover is None:
            raise ValueError("probe.target=landcover but the embeddings have no lc_* columns")
        return emb.landcover, emb.landcover_names
    if target not in emb.columns:
        raise ValueError(f"probe.target {target!r}: not a numeric column ({sorted(emb.columns)})")
    return emb.columns[target][:, None], [target]


def loro_probes(emb: Embeddings, target: str, folds: int = 5, max_per_region: int | None = 1000,
                seed: int = 0) -> list[dict[str, Any]]:
    """Leave-one-region-out ridge probes vs in-region cross-validation, per region: R² of each and their gap."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y, names = probe_target(emb, target)
    ok = np.isfinite(y).all(1)
    rng = np.random.default_rng(seed)
    keep = {r: _subsample(np.flatnonzero((emb.region == r) & ok), max_per_region, rng) for r in emb.regions}

    def model():
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))

    out = []
    for r, idx in keep.items():
        others = np.concatenate([v for q, v in keep.items() if q != r])
        if len(idx) < max(folds, 3) or len(others) < 3:
            continue
        loro = model().fit(emb.x[others], y[others]).predict(emb.x[idx])
        cv = KFold(min(folds, len(idx)), shuffle=True, random_state=seed)
        inreg = cross_val_predict(model(), emb.x[idx], y[idx], cv=cv)
        r2_out = float(r2_score(y[idx], loro.reshape(y[idx].shape)))
        r2_in = float(r2_score(y[idx], inreg.reshape(y[idx].shape)))
        out.append({"region": r, "target": target, "n": int(len(idx)), "n_train_loro": int(len(others)),
                    "r2_in_region": r2_in, "r2_leave_region_out": r2_out, "gap": r2_in - r2_out})
        log.info("probe %s on %s: in-region R² %.3f, leave-region-out R² %.3f", target, r, r2_in, r2_out)
    return out


# --- outputs -------------------------------------------------------------------------------------------------------

def _matrix(rows: Sequence[Mapping[str, Any]], regions: Sequence[str], metric: str, control: str) -> np.ndarray:
    m = np.full((len(regions), len(regions)), np.nan)
    pos = {r: i for i, r in enumerate(regions)}
    for r in rows:
        if r["metric"] == metric and r["control"] == control:
            i, j = pos[r["region_a"]], pos[r["region_b"]]
            m[i, j] = m[j, i] = r["value"]
    return m


def heatmap(path: str, matrix: np.ndarray, regions: Sequence[str], title: str,
            significant: np.ndarray | None = None) -> None:
    """Region × region heatmap with values (``*``: significant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(regions), 1.0 + 0.8 * len(regions)))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(regions)), regions, rotation=45, ha="right")
    ax.set_yticks(range(len(regions)), regions)
    for i, j in itertools.product(range(len(regions)), repeat=2):
        if np.isfinite(matrix[i, j]):
            star = "*" if significant is not None and significant[i, j] else ""
            ax.text(j, i, f"{matrix[i, j]:.3g}{star}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pca_scatter(path: str, xy: np.ndarray, region: np.ndarray, explained: Sequence[float]) -> None:
    """Chips on the first two principal components, coloured by region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for r in sorted(set(region.tolist())):
        sel = region == r
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, label=f"{r} ({int(sel.sum())})")
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f} %)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f} %)" if len(explained) > 1 else "PC2")
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title("Embeddings by region (PCA)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: str, emb: Embeddings, result: Mapping[str, Any],
                  probes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """shift.json, pairs.csv, probes.csv, heatmaps and the PCA scatter under local directory ``out``."""
    os.makedirs(out, exist_ok=True)
    rows, regions = result["pairs"], result["regions"]
    files: dict[str, Any] = {"images": {}}
    fields = ["control", "region_a", "region_b", "metric", "value", "ci_lo", "ci_hi", "null", "p_value",
              "significant", "rank_mmd2", "n_a", "n_b", "n_a_available", "n_b_available", "bandwidth"]
    with open(os.path.join(out, "pairs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    files["pairs"] = os.path.join(out, "pairs.csv")
    if probes:
        with open(os.path.join(out, "probes.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, list(probes[0]))
            w.writeheader()
            w.writerows(probes)
        files["probes"] = os.path.join(out, "probes.csv")
    for control in result["controls"]:
        for metric in {r["metric"] for r in rows}:
            m = _matrix(rows, regions, metric, control)
            sig = np.zeros_like(m, bool)
            pos = {r: i for i, r in enumerate(regions)}
            for r in rows:
                if r["metric"] == metric and r["control"] == control and r.get("significant"):
                    sig[pos[r["region_a"]], pos[r["region_b"]]] = sig[pos[r["region_b"]], pos[r["region_a"]]] = True
            p = os.path.join(out, f"heatmap_{metric}_{control}.png")
            heatmap(p, m, regions, f"{metric} ({'no control' if control == 'none' else 'matched on ' + control}); "
                                   "* = significant", sig)
            files["images"][f"{metric}_{control}"] = p
    pca, keep = result["_pca"], result["_keep"]
    rows_all = np.concatenate(list(keep.values()))
    xy = pca.transform(emb.x[rows_all])[:, :2]
    p = os.path.join(out, "pca_regions.png")
    pca_scatter(p, xy, emb.region[rows_all], pca.explained_variance_ratio_[:2])
    files["images"]["pca_regions"] = p
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    with open(os.path.join(out, "shift.json"), "w") as f:
        json.dump({**public, "probes": list(probes), "files": files}, f, indent=1, default=_json_default)
    files["json"] = os.path.join(out, "shift.json")
    return files


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    return str(o)


def log_wandb(cfg: DictConfig, result: Mapping[str, Any], probes: Sequence[Mapping[str, Any]],
              files: Mapping[str, Any]) -> str | None:
    """The tables and images to W&B (mode as in training: offline unless an API key is configured)."""
    import wandb

    from m3leo_stream.train import wandb_mode

    w = cfg.logger.wandb
    mode = wandb_mode(w.get("mode"))
    if mode == "disabled":
        return None
    save_dir = w.get("save_dir") or str(cfg.out)
    os.makedirs(save_dir, exist_ok=True)
    run = wandb.init(project=w.project, entity=w.get("entity"), name=w.get("name") or cfg.experiment_name,
                     mode=mode, dir=save_dir, tags=list(w.get("tags") or []), job_type="shift",
                     config={k: v for k, v in cast(dict, OmegaConf.to_container(cfg, resolve=True)).items()
                             if k != "logger"})
    cols: list[Any] = ["control", "region_a", "region_b", "metric", "value", "ci_lo", "ci_hi", "null", "p_value",
            "significant", "rank_mmd2", "n_a", "n_b"]
    table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in result["pairs"]])
    payload: dict[str, Any] = {"shift/pairs": table}
    if probes:
        pc: list[Any] = list(probes[0])
        payload["shift/probes"] = wandb.Table(columns=pc, data=[[p[c] for c in pc] for p in probes])
    for name, path in files["images"].items():
        payload[f"shift/{name}"] = wandb.Image(path)
    run.log(payload)
    where = str(Path(run.dir).parent) if getattr(run, "dir", None) else None
    wandb.finish()
    return where


def run(cfg: DictConfig) -> dict[str, Any]:
    """The analysis of ``cfg.input`` written to ``cfg.out``; returns the result (rows, probes, files)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emb = load_embeddings(str(cfg.input), list(cfg.splits) if cfg.get("splits") else None)
    s = ShiftSettings(n_boot=int(cfg.n_boot), n_perm=int(cfg.n_perm), level=float(cfg.level),
                      alpha=float(cfg.alpha), pca_dim=cfg.pca_dim, cv_folds=int(cfg.cv_folds),
                      max_per_region=cfg.max_per_region, min_chips=int(cfg.min_chips), seed=int(cfg.seed),
                      metrics=tuple(cfg.metrics))
    controls = [c for c in cfg.controls if c == "none" or _has(emb, c)]
    skipped = sorted(set(cfg.controls) - set(controls))
    if skipped:
        log.warning("controls %s skipped: the embeddings lack their columns", skipped)
    result = analyze(emb, s, controls, float(cfg.caliper.landcover), float(cfg.caliper.terrain),
                     list(cfg.regions) if cfg.get("regions") else None)
    probes: list[dict[str, Any]] = []
    target = cfg.probe.get("target")
    if target and (target != "landcover" or emb.landcover is not None):
        probes = loro_probes(emb, str(target), int(cfg.cv_folds), cfg.max_per_region, int(cfg.seed))
    files = write_outputs(str(cfg.out), emb, result, probes)
    if cfg.get("logger") and cfg.logger.get("wandb") is not None:
        files["wandb"] = log_wandb(cfg, result, probes, files)
    print(json.dumps({"m3leo_shift": {"out": str(cfg.out), "json": files["json"], "wandb": files.get("wandb")}}))
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    return {**public, "probes": probes, "files": files}


def _has(emb: Embeddings, control: str) -> bool:
    need_lc = control in ("landcover", "landcover_terrain")
    need_tr = control in ("terrain", "landcover_terrain")
    return (not need_lc or emb.landcover is not None) and (not need_tr or emb.terrain is not None)


@hydra.main(config_path=CONFIG_DIR, config_name="shift", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        from m3leo_stream._warnings import quiet_dependencies

        quiet_dependencies()
    run(cfg)


if __name__ == "__main__":
    main()
