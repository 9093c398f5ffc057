"""Host→device copies (and, optionally, the device transforms) off the training step's critical path.

The loader (``datamodule``) holds one batch ahead of the consumer: when Lightning's training loop asks for batch
``k``, batch ``k+1`` is taken from the reader and handed to :meth:`DeviceFeed.put`, which copies its tensors to the
device on a side CUDA stream (``non_blocking=True``; from pinned memory the copy is a DMA that returns at once) and
records an event after the copy. Lightning then runs step ``k`` on the current stream while the copy of ``k+1``
proceeds on the side stream. (Lightning 2.6's ``_PrefetchDataFetcher`` does not fetch ahead itself when the loader
has a length, as ours do, so the one-batch lead is the loader's.)

When batch ``k+1`` reaches ``on_after_batch_transfer``, Lightning's ``batch_to_device`` has found its tensors on the
device already (a no-op); :func:`take` makes the current stream wait for the copy's event (``wait_event``: the GPU
waits, the host does not) and marks every device tensor as used on the current stream (``record_stream``), so the
caching allocator does not hand their memory to the side stream while the step still reads it. The reader's pinned
buffers are fenced with the same event (``ShardDataset.fence``): they are reused only once the copy has completed.

With ``ahead`` the device transforms of ``k+1`` run on the side stream too, right after its copy, for the (transform
instance, step) predicted when ``k+1`` was fetched; at consumption :meth:`Ticket.result` hands that result over only
if the transforms and step in use then are exactly those (else the transforms run in place as before), so the
output is always the one the synchronous path computes.

On the CPU (``device`` cpu, tests) there are no streams or events: the batch is handed over as it is, and the ahead
transforms simply run at fetch time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

FEED_KEY = "_feed"
"""Batch key carrying the :class:`Ticket` from the loader to ``on_after_batch_transfer``, which pops it."""


class FeedCounters:
    """What the feed measures, without ever synchronising the host with the device."""

    def __init__(self) -> None:
        self.batches = 0  # batches copied by the feed
        self.bytes = 0  # host→device bytes of those batches
        self.enqueue_s = 0.0  # host time spent issuing the copies (long if the source was not pinned)
        self.copy_s = 0.0  # device time of the copies that have completed (CUDA timing events, read once done)
        self.late = 0  # batches whose copy had not completed when their step's stream reached them (GPU waited)
        self.ahead = 0  # batches whose transforms, run ahead, were used
        self.ahead_missed = 0  # ... run ahead for a step or split that turned out different: recomputed in place

    def as_dict(self) -> dict[str, float]:
        return {"h2d_batches": float(self.batches), "h2d_bytes": float(self.bytes), "h2d_enqueue_s": self.enqueue_s,
                "h2d_copy_s": self.copy_s, "h2d_late": float(self.late),
                "transforms_ahead": float(self.ahead), "transforms_ahead_missed": float(self.ahead_missed)}


class Ticket:
    """What travels with a batch from :meth:`DeviceFeed.put` to :func:`take` (a plain object: Lightning's
    ``batch_to_device`` leaves it alone)."""

    __slots__ = ("device", "event", "counters", "transforms", "step", "output")

    def __init__(self, device: torch.device, event: Any, counters: FeedCounters):
        self.device = device
        self.event = event  # CUDA event after the batch's last side-stream work; None on the CPU
        self.counters = counters
        self.transforms: Any = None  # the transforms run ahead, the step they ran for, and their output
        self.step: int | None = None
        self.output: dict[str, Any] | None = None

    def result(self, transforms: Any, step: int) -> dict[str, Any] | None:
        """The output computed ahead, if it was computed by ``transforms`` for ``step``; else ``None`` (and the
        miss is counted when something had been computed ahead)."""
        if self.output is None:
            return None
        out, self.output = self.output, None
        if transforms is self.transforms and step == self.step:
            self.counters.ahead += 1
            return out
        self.counters.ahead_missed += 1
        return None


def _tensors(batch: Mapping[str, Any]) -> Iterable[torch.Tensor]:
    return (v for v in batch.values() if isinstance(v, torch.Tensor))


class DeviceFeed:
    """Copies loader batches to ``device`` ahead of their step (see the module docstring).

    ``fence(tensors, event)`` is told which host tensors an asynchronous copy reads and the event after which they
    may be reused (the reader's ``ShardDataset.fence``).
    """

    def __init__(self, device: torch.device | str, fence: Callable[[Iterable[torch.Tensor], Any], None] | None = None,
                 counters: FeedCounters | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.fence = fence
        self.counters = counters if counters is not None else FeedCounters()
        self._timing: deque[tuple[Any, Any]] = deque()

    def put(self, batch: Mapping[str, Any], ahead: tuple[Any, int] | None = None) -> dict[str, Any]:
        """The batch with its tensors on the device (copies issued on the side stream) and a :class:`Ticket` under
        :data:`FEED_KEY`; with ``ahead=(transforms, step)`` also ``transforms(batch, step=step)`` computed there."""
        t0 = time.perf_counter()
        host = [v for v in _tensors(batch) if v.device.type == "cpu"]
        if not self.cuda:
            out = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            ticket = Ticket(self.device, None, self.counters)
        else:
            self._read_timings()
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.stream):
                start.record(self.stream)
                out = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                       for k, v in batch.items()}
                done.record(self.stream)
            if self.fence is not None:
                self.fence(host, done)
            self._timing.append((start, done))
            ticket = Ticket(self.device, done, self.counters)
        self.counters.batches += 1
        self.counters.bytes += sum(v.numel() * v.element_size() for v in host)
        self.counters.enqueue_s += time.perf_counter() - t0
        if ahead is not None:
            transforms, step = ahead
            if self.stream is not None:
                # what the transforms cached on the device (per-band constants) may have been made on the current
                # stream: that work comes first. This waits for the step before the one this batch overlaps, not
                # for that one (it is not issued yet).
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    ticket.output = transforms(out, step=step)
                    ticket.event = torch.cuda.Event()
                    ticket.event.record(self.stream)
            else:
                ticket.output = transforms(out, step=step)
            ticket.transforms, ticket.step = transforms, int(step)
        out[FEED_KEY] = ticket
        return out

    def _read_timings(self) -> None:
        """Add the device time of completed copies (events that have completed are read without a sync)."""
        while self._timing and self._timing[0][1].query():
            start, done = self._timing.popleft()
            self.counters.copy_s += start.elapsed_time(done) / 1000.0
        while len(self._timing) > 64:  # never read (should not happen): do not keep events forever
            self._timing.popleft()


def take(batch: Any) -> tuple[Any, Ticket | None]:
    """At consumption (``on_after_batch_transfer``): pop the batch's ticket; on CUDA the current stream waits for the
    batch's side-stream work and its device tensors (and those computed ahead) are recorded on the current stream.
    Batches that did not come through a feed are returned as they are, with ``None``."""
    if not isinstance(batch, Mapping) or FEED_KEY not in batch:
        return batch, None
    batch = dict(batch)
    ticket = batch.pop(FEED_KEY)
    if ticket.event is not None:
        cur = torch.cuda.current_stream(ticket.device)
        if not ticket.event.query():
            ticket.counters.late += 1
        cur.wait_event(ticket.event)
        for t in _tensors(batch):
            if t.is_cuda:
                t.record_stream(cur)
        for t in _tensors(ticket.output or {}):
            if t.is_cuda:
                t.record_stream(cur)
    return batch, ticket
