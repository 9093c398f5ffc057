"""The planner as a pure function: order, elastic partitioning, exact quotas, evaluation coverage."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from m3leo_stream.planner import (
    PAD_FLAG,
    PlanError,
    build_catalog,
    plan_eval,
    plan_train_epoch,
    region_quotas,
    train_order,
)


def make_index(sizes: dict[tuple[str, str], int], missing_every: int = 0) -> dict[str, np.ndarray]:
    """An index of shards ``{(region, shard): n}``, all in split train (plus one val shard per region)."""
    cols: dict[str, list] = {"split": [], "region": [], "shard": [], "a_nbytes": [], "b_nbytes": []}
    i = 0
    for (region, shard), n in sizes.items():
        for split in ("train", "val"):
            for _ in range(n if split == "train" else 3):
                cols["split"].append(split)
                cols["region"].append(region)
                cols["shard"].append(f"{region}/{split}/{shard}")
                cols["a_nbytes"].append(10)
                cols["b_nbytes"].append(np.nan if missing_every and i % missing_every == 0 else 10.0)
                i += 1
    return {k: np.asarray(v) for k, v in cols.items()}


SIZES = {("r0", "s0"): 40, ("r0", "s1"): 3, ("r0", "s2"): 17, ("r1", "s0"): 9, ("r1", "s1"): 31,
         ("r2", "s0"): 5, ("r2", "s1"): 15}
REGIONS = ("r0", "r1", "r2")


@pytest.fixture()
def cat():
    return build_catalog(make_index(SIZES), "train", REGIONS, ["a"])


def test_catalog_excludes_missing_members_and_counts_them():
    idx = make_index(SIZES, missing_every=4)
    full = build_catalog(idx, "train", REGIONS, ["a"])
    part = build_catalog(idx, "train", REGIONS, ["a", "b"])
    assert len(full) == sum(SIZES.values())
    missing = int(np.isnan(idx["b_nbytes"][idx["split"] == "train"]).sum())
    assert missing > 0 and part.excluded == {"b": missing} and len(part) == len(full) - missing
    assert not np.isnan(idx["b_nbytes"][part.rows]).any()
    with pytest.raises(PlanError, match="unknown regions"):
        build_catalog(idx, "train", REGIONS, ["a"], regions=["mars"])


def test_order_is_pure_and_elastic(cat):
    a = plan_train_epoch(cat, seed=3, epoch=1, global_batch=12)
    b = plan_train_epoch(cat, seed=3, epoch=1, global_batch=12)
    assert np.array_equal(a.refs, b.refs)
    assert not np.array_equal(a.refs, plan_train_epoch(cat, seed=3, epoch=2, global_batch=12).refs)
    assert not np.array_equal(a.refs, plan_train_epoch(cat, seed=4, epoch=1, global_batch=12).refs)
    for world in (1, 2, 3, 4, 6, 12):
        for g in range(a.num_batches):
            parts = [a.rank_batch(g, r, world) for r in range(world)]
            assert len({len(p) for p in parts}) == 1
            assert sum(parts, []) == a.refs[g * 12:(g + 1) * 12].tolist()
    with pytest.raises(PlanError, match="not divisible"):
        a.rank_batch(0, 0, 5)


def test_train_epoch_uses_every_sample_once(cat):
    total = len(cat)  # 120: divisible by 12
    plan = plan_train_epoch(cat, seed=0, epoch=0, global_batch=12)
    assert plan.num_batches * 12 == total
    assert sorted(plan.refs.tolist()) == sorted(cat.rows.tolist())
    # a global batch that does not divide the epoch: full batches only, no duplicates, fewer than G left out
    plan = plan_train_epoch(cat, seed=0, epoch=0, global_batch=16)
    assert plan.num_batches == total // 16 and len(set(plan.refs.tolist())) == len(plan.refs)


def test_block_shuffle_mixes_shards_within_bounded_blocks(cat):
    order = train_order(cat, seed=0, epoch=0, shuffle_shards=2)
    shard = cat.shard[order]
    # neighbouring samples come from different shards often (mixing), but each region walks ≤ 2 shards at a time
    assert (shard[1:] != shard[:-1]).mean() > 0.3
    for r in range(3):
        seq = shard[cat.region[order] == r]
        window = len(seq) // 4
        assert max(len(set(seq[i:i + window].tolist())) for i in range(0, len(seq) - window)) <= 4
    one = train_order(cat, seed=0, epoch=0, shuffle_shards=1)
    runs = np.count_nonzero(cat.shard[one][1:] != cat.shard[one][:-1])
    assert runs > 0


def test_region_weights_give_exact_quotas_and_rotate(cat):
    counts = cat.region_counts()
    assert counts == {"r0": 60, "r1": 40, "r2": 20}
    weights = {"r0": 1, "r1": 1, "r2": 2}
    quotas = region_quotas(counts, weights)
    assert quotas == {"r0": 30, "r1": 30, "r2": 60} and sum(quotas.values()) == 120
    seen = {r: Counter() for r in REGIONS}
    for epoch in range(2):
        order = train_order(cat, seed=5, epoch=epoch, quotas=quotas)
        got = Counter(cat.region_names[i] for i in cat.region[order])
        assert dict(got) == quotas
        for pos in order:
            seen[cat.region_names[cat.region[pos]]][int(pos)] += 1
        if epoch == 0:
            r2 = Counter(order[cat.region[order] == 2].tolist())
            assert set(r2.values()) == {3}  # 60 draws of 20 samples: each exactly 3 times (whole passes)
    # the down-sampled regions used every sample exactly once over two epochs (rotation, not re-sampling)
    assert set(seen["r0"].values()) == {1} and len(seen["r0"]) == 60
    # r1: 60 draws of 40 samples = one whole pass, then 20 of the next: all used, none a third time
    assert len(seen["r1"]) == 40 and sorted(Counter(seen["r1"].values()).items()) == [(1, 20), (2, 20)]
    # largest remainder: exact integers that sum to the total
    q = region_quotas({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1}, total=10)
    assert sorted(q.values()) == [3, 3, 4] and sum(q.values()) == 10
    with pytest.raises(PlanError):
        region_quotas(counts, {"r0": -1})
    with pytest.raises(PlanError):
        region_quotas(counts, {"nowhere": 1})


def test_region_mixing_is_proportional_within_the_epoch(cat):
    quotas = {"r0": 60, "r1": 40, "r2": 20}
    order = train_order(cat, seed=1, epoch=0, quotas=quotas)
    first_half = Counter(int(r) for r in cat.region[order[:60]])
    assert abs(first_half[0] - 30) <= 2 and abs(first_half[1] - 20) <= 2 and abs(first_half[2] - 10) <= 2


def test_eval_plan_covers_every_sample_once_with_flagged_padding():
    cat = build_catalog(make_index(SIZES), "val", REGIONS, ["a"])
    n = len(cat)  # 21
    for world, batch in ((1, 4), (2, 4), (3, 2), (4, 5)):
        plan = plan_eval(cat, global_batch=world * batch)
        per_rank = [[plan.rank_batch(g, r, world) for g in range(plan.num_batches)] for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1
        refs = [x for p in per_rank for b in p for x in b]
        real = [x for x in refs if not x & int(PAD_FLAG)]
        assert sorted(real) == sorted(cat.rows.tolist())
        assert len(refs) - len(real) == plan.num_batches * world * batch - n
        assert all((x & ~int(PAD_FLAG)) in set(cat.rows.tolist()) for x in refs)


def test_optional_members_keep_samples_and_are_counted_per_region():
    idx = make_index(SIZES, missing_every=4)
    train = idx["split"] == "train"
    kept = build_catalog(idx, "train", REGIONS, ["a", "b"], optional=["b"])
    assert len(kept) == int(train.sum()) and kept.excluded == {}
    for r in REGIONS:
        rows = train & (idx["region"] == r)
        assert kept.presence[r] == {"a": int(rows.sum()), "b": int((rows & ~np.isnan(idx["b_nbytes"])).sum())}
    # at least both present: the same rows as requiring b, counted under the rule
    both = build_catalog(idx, "train", REGIONS, ["a", "b"], optional=["a", "b"], min_present=2)
    required = build_catalog(idx, "train", REGIONS, ["a", "b"])
    assert np.array_equal(both.rows, required.rows) and list(both.excluded.values()) == [required.excluded["b"]]
    # a region without any b keeps all its samples, and its count of b is 0
    idx["b_nbytes"][idx["region"] == "r2"] = np.nan
    gone = build_catalog(idx, "train", REGIONS, ["a", "b"], optional=["b"])
    assert gone.presence["r2"]["b"] == 0 and gone.region_counts()["r2"] == SIZES["r2", "s0"] + SIZES["r2", "s1"]
    assert build_catalog(idx, "train", REGIONS, ["a", "b"]).region_counts()["r2"] == 0
    with pytest.raises(PlanError, match="optional modalities"):
        build_catalog(idx, "train", REGIONS, ["a"], optional=["c"])
    with pytest.raises(PlanError, match="min_present"):
        build_catalog(idx, "train", REGIONS, ["a"], min_present=2)


def test_catalog_codes_and_presence_of_integer_and_string_shards_agree():
    """Shard codes given as integers (the mapped index) are compacted to the same dense codes as their strings,
    and the per-region presence counts are those of the rows kept."""
    idx = make_index(SIZES, missing_every=5)
    names, codes = np.unique(idx["shard"], return_inverse=True)
    shuffled = np.random.default_rng(0).permutation(len(names) * 3)[:len(names)]  # sparse, unordered codes
    by_int = {**idx, "shard": shuffled[codes]}
    a = build_catalog(idx, "train", REGIONS, ["a", "b"], optional=["b"])
    b = build_catalog(by_int, "train", REGIONS, ["a", "b"], optional=["b"])
    assert np.array_equal(a.rows, b.rows)
    assert np.array_equal(b.shard, np.unique(by_int["shard"][b.rows], return_inverse=True)[1])
    assert len(set(zip(a.shard.tolist(), b.shard.tolist()))) == len(set(a.shard.tolist()))  # the same grouping
    for r, name in enumerate(REGIONS):
        rows = a.rows[a.region == r]
        assert a.presence[name] == {"a": len(rows), "b": int((~np.isnan(idx["b_nbytes"][rows])).sum())}
