"""``PlannedBatchSampler``: this rank's batches of the planner's epoch plans, with the position a resumed loader
starts at and the next epoch planned in the background."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .planner import EpochPlan


@functools.lru_cache(maxsize=1)
def _planning_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="m3leo-plan")


class PlannedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's part of each global batch of an epoch plan. Lightning calls ``set_epoch``."""

    def __init__(self, plan_for_epoch: Callable[[int], EpochPlan], rank: int, world_size: int, epoch: int = 0,
                 fingerprint: Mapping[str, Any] | None = None, plan_ahead: bool = False):
        """``plan_ahead``: once an epoch is planned, plan the next one on a background thread (it takes seconds at
        millions of samples, and would otherwise stall the step at the epoch boundary)."""
        self._plan_for_epoch = plan_for_epoch
        self._plan_ahead = plan_ahead
        self._ahead: tuple[int, Future] | None = None
        self.rank, self.world_size = rank, world_size
        self.epoch = epoch
        self.fingerprint = dict(fingerprint or {})  # what a resumed run must share with the saved one
        self._plans: dict[int, EpochPlan] = {}  # this epoch's and, once read ahead, the next one's
        self.position: tuple[int, int] | None = None  # (epoch, batch) last yielded, for read-ahead
        self._start = 0  # first batch of the next iteration
        self.offset = 0  # first batch of the current iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self) -> PlannedBatchSampler:
        """Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``; this makes the
        latter reach the planner."""
        return self

    @property
    def plan(self) -> EpochPlan:
        return self.plan_for(self.epoch)

    def plan_for(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            for old in [e for e in self._plans if e not in (self.epoch, epoch)]:
                del self._plans[old]
            ahead, self._ahead = self._ahead, None
            self._plans[epoch] = ahead[1].result() if ahead and ahead[0] == epoch else self._plan_for_epoch(epoch)
            if self._plan_ahead and epoch + 1 not in self._plans:
                self._ahead = (epoch + 1, _planning_thread().submit(self._plan_for_epoch, epoch + 1))
        return self._plans[epoch]

    def __len__(self) -> int:
        return self.plan.num_batches

    def start_at(self, batch: int) -> None:
        """Begin the next iteration at ``batch`` of the epoch (a restored position)."""
        self._start = int(batch)

    def __iter__(self) -> Iterator[list[int]]:
        # offset is set now, not at the first batch: the loader's state reads it. A restored start holds until a
        # batch is taken (DataLoader iterators call iter() more than once before their first batch).
        plan, epoch = self.plan, self.epoch
        self.offset = self._start
        return self._batches(plan, epoch, self.offset)

    def _batches(self, plan: EpochPlan, epoch: int, start: int) -> Iterator[list[int]]:
        for g in range(start, plan.num_batches):
            self.position = (epoch, g)
            self._start = 0
            yield plan.rank_batch(g, self.rank, self.world_size)

    def batch_at(self, position: tuple[int, int]) -> list[int] | None:
        """This rank's batch at (epoch, batch), ``None`` past the epoch's end (for read-ahead)."""
        epoch, g = position
        plan = self.plan_for(epoch)
        return plan.rank_batch(g, self.rank, self.world_size) if 0 <= g < plan.num_batches else None
