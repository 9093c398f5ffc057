"""Thread-mode loading: the training process itself reads the next planned batches on a few threads.

The reader's work is ``preadv``/ranged GETs into the batch arrays (the GIL is released while bytes move) plus a little
bookkeeping, so it needs no worker processes. Without them a batch is never copied into shared memory and mapped again
by the consumer, which on page-cached or fast storage costs several times the read itself. Because the plan is known
in advance, the next ``depth`` batches are read while the consumer works on the current one.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

Position = tuple[int, int]  # (epoch, batch number in the epoch)


class PlannedSampler(Protocol):
    """What read-ahead needs from the batch sampler: where the consumer is and what comes next."""

    position: Position | None

    def batch_at(self, position: Position) -> list[int] | None: ...


class ReadAheadDataset(torch.utils.data.Dataset):
    """Wraps a reader dataset (``__getitems__`` → collated batch) for a ``num_workers=0`` loader.

    When the loader asks for the batch at the sampler's current position, the batches at the following ``depth``
    positions are submitted to ``threads`` reader threads; a batch already read ahead is handed over, anything else
    (a resumed position, another epoch than expected) is read on the spot. With ``next_epoch`` the read-ahead runs on
    into the first batches of the following epoch (training: they are read during validation or the epoch's last
    steps). Errors surface when their batch is asked for, exactly as in worker mode. ``pin`` pins each batch in the
    reader thread (``pin_memory`` for CUDA); ``count(ahead)`` is told for every batch whether it had been read ahead.
    """

    def __init__(self, dataset: Any, sampler: PlannedSampler, threads: int, depth: int,
                 pin: Callable[[Any], Any] | None = None, next_epoch: bool = False,
                 count: Callable[[bool], None] | None = None):
        self.dataset = dataset
        self.sampler = sampler
        self.depth = max(1, int(depth))
        self.pin = pin
        self.next_epoch = next_epoch
        self.count = count
        self._pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="m3leo-readahead")
        self._pending: dict[Position, tuple[tuple[int, ...], Future]] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, ref: int) -> Any:
        return self.dataset[ref]

    def _read(self, refs: Sequence[int]) -> Any:
        batch = self.dataset.__getitems__(refs)
        return self.pin(batch) if self.pin is not None else batch

    def __getitems__(self, refs: Sequence[int]) -> Any:
        refs = tuple(int(r) for r in refs)
        pos = self.sampler.position
        with self._lock:
            ahead = self._pending.pop(pos, None) if pos is not None else None
            stale = [p for p in self._pending if pos is None or p <= pos or p[0] > pos[0] + 1]
            for p in stale:
                self._pending.pop(p)[1].cancel()
            if pos is not None:
                self._top_up(pos)
        hit = ahead is not None and ahead[0] == refs
        if self.count is not None:
            self.count(hit)
        if ahead is not None and hit:
            return ahead[1].result()
        if ahead is not None:
            ahead[1].cancel()
            log.debug("read-ahead for %s planned other samples; reading on the spot", pos)
        return self._read(refs)

    def _top_up(self, pos: Position) -> None:
        """Submit the next ``depth`` positions after ``pos`` that are not yet pending."""
        cur = pos
        for _ in range(self.depth):
            nxt = (cur[0], cur[1] + 1)
            want = self._pending[nxt][0] if nxt in self._pending else self.sampler.batch_at(nxt)
            if want is None:
                if not self.next_epoch or cur[0] != pos[0]:
                    return
                nxt = (cur[0] + 1, 0)
                want = self._pending[nxt][0] if nxt in self._pending else self.sampler.batch_at(nxt)
                if want is None:
                    return
            if nxt not in self._pending:
                self._pending[nxt] = (tuple(want), self._pool.submit(self._read, want))
            cur = nxt
