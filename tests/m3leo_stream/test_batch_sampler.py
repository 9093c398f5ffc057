"""The batch sampler: ranks split each global batch, a restored start holds for one iteration, epochs planned ahead."""

from __future__ import annotations

import threading

import numpy as np

from m3leo_stream.batch_sampler import PlannedBatchSampler
from m3leo_stream.planner import EpochPlan


def plan_for(epoch: int) -> EpochPlan:
    """Epoch ``e``: 5 global batches of 4, refs ``100*e + 0..19``."""
    return EpochPlan(np.arange(20, dtype=np.int64) + 100 * epoch, global_batch=4)


def test_ranks_take_disjoint_parts_of_each_global_batch():
    ranks = [list(PlannedBatchSampler(plan_for, r, 2)) for r in range(2)]
    assert [len(b) for b in ranks] == [5, 5]
    for g in range(5):
        assert sorted(ranks[0][g] + ranks[1][g]) == list(range(4 * g, 4 * g + 4))
    assert ranks[0][0] == [0, 1] and ranks[1][0] == [2, 3]


def test_set_epoch_and_start_at_hold_for_one_iteration():
    s = PlannedBatchSampler(plan_for, 0, 1)
    s.set_epoch(2)
    s.start_at(3)
    assert s.sampler is s and len(s) == 5
    assert list(s) == [[212, 213, 214, 215], [216, 217, 218, 219]]
    assert s.offset == 3 and s.position == (2, 4)
    assert len(list(s)) == 5  # the next iteration starts at the epoch's first batch


def test_batch_at_reaches_the_next_epoch_and_ends_with_none():
    s = PlannedBatchSampler(plan_for, 1, 2)
    assert s.batch_at((0, 4)) == [18, 19]
    assert s.batch_at((0, 5)) is None
    assert s.batch_at((1, 0)) == [102, 103]


def test_plan_ahead_plans_the_next_epoch_off_the_calling_thread():
    threads: dict[int, str] = {}

    def recording(epoch: int) -> EpochPlan:
        threads[epoch] = threading.current_thread().name
        return plan_for(epoch)

    s = PlannedBatchSampler(recording, 0, 1, plan_ahead=True)
    assert s.plan.refs[0] == 0
    s.set_epoch(1)
    assert s.plan.refs[0] == 100
    assert threads[0] == threading.current_thread().name
    assert threads[1].startswith("m3leo-plan")
