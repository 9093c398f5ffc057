"""The training and evaluation loader and its metrics: ``M3LEOLoader`` strips the readers' I/O counters from each
batch into a ``LoaderMetrics`` (shared by all loaders of a DataModule), times the consumer's wait, optionally holds
one batch ahead on the device feed, and saves and restores its position in the epoch plan."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torchdata.stateful_dataloader import StatefulDataLoader

from .batch_sampler import PlannedBatchSampler
from .device_feed import DeviceFeed, FeedCounters
from .reader import IO_KEY, io_from_tensor
from .storage import IOCounters

__all__ = ["LoaderMetrics", "M3LEOLoader"]


@dataclass
class LoaderMetrics:
    """Cumulative loader figures of this process (all loaders of a DataModule share one)."""

    io: IOCounters = field(default_factory=IOCounters)
    samples: int = 0
    wait_s: float = 0.0
    read_s: float = 0.0
    first: float | None = None
    read_ahead: int = 0  # thread mode: batches that were read ahead when asked for
    read_on_the_spot: int = 0  # ... and batches that were not (an epoch's first, a resumed position)
    feed: FeedCounters = field(default_factory=FeedCounters)  # host→device copies ahead of the step

    def count_read_ahead(self, ahead: bool) -> None:
        if ahead:
            self.read_ahead += 1
        else:
            self.read_on_the_spot += 1

    def as_dict(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.first, 1e-9) if self.first is not None else 0.0
        return {
            "samples_per_s": self.samples / elapsed if elapsed else 0.0,
            "bytes_per_s": self.io.bytes / elapsed if elapsed else 0.0,
            "samples": float(self.samples),
            "bytes": float(self.io.bytes),
            "requests": float(self.io.requests),
            "retries": float(self.io.retries),
            "substitutions": float(self.io.substitutions),
            "checksum_failures": float(self.io.checksum_failures),
            "cache_hits": float(self.io.cache_hits),
            "cache_bytes": float(self.io.cache_bytes),
            "wait_s": self.wait_s,
            "worker_read_s": self.read_s,
            "batches_read_ahead": float(self.read_ahead),
            "batches_read_on_the_spot": float(self.read_on_the_spot),
            **self.feed.as_dict(),
        }


class M3LEOLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` that strips the workers' I/O counters from batches into ``metrics`` and times how
    long the consumer waits for each batch."""

    def __init__(self, *args: Any, metrics: LoaderMetrics | None = None, feed: DeviceFeed | None = None,
                 plan_ahead: Callable[[], tuple[Any, int] | None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metrics = metrics if metrics is not None else LoaderMetrics()
        self.feed = feed  # copies each batch to the device one batch ahead of its consumer (None: hand over as is)
        self.plan_ahead = plan_ahead  # with a feed: (transforms, step) to run ahead on the next batch, or None
        self._current: _MeteredIterator | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = super().__iter__()
        self._current = _MeteredIterator(it, self.metrics, self.feed, self.plan_ahead)
        return self._current

    def state_dict(self) -> dict[str, Any]:
        """torchdata's state plus ours: the epoch, the batches of it handed to the consumer, and the plan's
        fingerprint. Ours alone restores the position, so a run resumes whatever ``num_workers`` or
        ``worker_mode`` it had or has now."""
        state = super().state_dict()
        sampler = self.batch_sampler
        if isinstance(sampler, PlannedBatchSampler):
            # a batch the feed holds ahead has left the reader but not reached the consumer: it is not consumed
            held = self._current.held if self._current is not None else 0
            state["m3leo"] = {"epoch": sampler.epoch, "batches": sampler.offset + _batches_yielded(state) - held,
                              **sampler.fingerprint}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position. The epoch is set here, before any iterator exists: Lightning creates the train
        iterator on restart before it calls ``set_epoch``, and the first indices are dispatched at creation."""
        state = dict(state_dict)
        meta = state.pop("m3leo", None)
        sampler = self.batch_sampler
        if meta is None or not isinstance(sampler, PlannedBatchSampler):
            super().load_state_dict(state)
            return
        saved = {k: v for k, v in meta.items() if k not in ("epoch", "batches")}
        if "policy" not in saved and "policy" in sampler.fingerprint:  # saved before the policy was recorded:
            saved["policy"] = {**sampler.fingerprint["policy"], "optional": []}  # every member was required
        if saved != sampler.fingerprint:
            diff = {k: (saved.get(k), sampler.fingerprint.get(k))
                    for k in set(saved) | set(sampler.fingerprint) if saved.get(k) != sampler.fingerprint.get(k)}
            raise ValueError(f"cannot resume this loader position: the plan differs from the checkpoint's "
                             f"(saved, now): {diff}. Keep seed, region weights and the global batch "
                             "(batch_size × world size) unchanged to resume.")
        epoch = int(meta["epoch"])
        batches = int(meta["batches"]) if "batches" in meta else _batches_yielded(state)  # older checkpoints
        sampler.set_epoch(epoch)
        if batches >= len(sampler):
            # a finished epoch (a checkpoint at its last batch): the next epoch starts at its first batch.
            # Restoring "all yielded" would make Lightning's next epoch yield nothing.
            sampler.set_epoch(epoch + 1)
            batches = 0
        super().load_state_dict({})  # drop any iterator; the next one starts afresh
        sampler.start_at(batches)


def _batches_yielded(state: Mapping[str, Any]) -> int:
    """Batches handed to the consumer, from a torchdata state (single- or multi-process layout)."""
    main = state.get("_snapshot", {}).get("_main_snapshot", state)
    return int(main.get("_sampler_iter_yielded") or main.get("_num_yielded") or 0)


class _SizedIterator(Protocol):
    """A DataLoader's iterator: batches, and how many there are."""

    def __next__(self) -> dict[str, Any]: ...

    def __len__(self) -> int: ...


class _MeteredIterator:
    """Strips the I/O counters and meters the wait; with a ``feed``, also holds one batch ahead of the consumer,
    already handed to the feed (its copy to the device issued), so that the copy overlaps the consumer's step on
    the batch before. An error reading the batch ahead is raised when that batch is asked for."""

    def __init__(self, it: _SizedIterator, metrics: LoaderMetrics, feed: DeviceFeed | None = None,
                 plan_ahead: Callable[[], tuple[Any, int] | None] | None = None):
        self._it, self._m = it, metrics
        self._feed, self._plan_ahead = feed, plan_ahead
        self._held: dict[str, Any] | None = None
        self._error: Exception | None = None
        self._done = False

    def __iter__(self) -> _MeteredIterator:
        return self

    def __len__(self) -> int:
        return len(self._it)

    @property
    def held(self) -> int:
        """Batches taken from the reader and not yet handed to the consumer (0 or 1)."""
        return int(self._held is not None)

    def __next__(self) -> dict[str, Any]:
        if self._feed is None:
            return self._next()
        if self._held is not None:
            batch, self._held = self._held, None
        elif self._error is not None:
            err, self._error = self._error, None
            raise err
        elif self._done:
            raise StopIteration
        else:  # the first batch (or the one after an error): it is needed now, nothing to run ahead
            batch = self._feed.put(self._next())
        try:
            nxt = self._next()
            self._held = self._feed.put(nxt, self._plan_ahead() if self._plan_ahead is not None else None)
        except StopIteration:
            self._done = True
        except Exception as e:  # noqa: BLE001 - raised with its own batch, as without the feed
            self._error = e
        return batch

    def _next(self) -> dict[str, Any]:
        t = time.perf_counter()
        if self._m.first is None:
            self._m.first = t
        batch = next(self._it)
        self._m.wait_s += time.perf_counter() - t
        io = batch.pop(IO_KEY, None)
        if io is not None:
            counters, seconds = io_from_tensor(io)
            self._m.io.add(counters)
            self._m.read_s += seconds
        self._m.samples += int(batch["valid"].sum())
        return batch
