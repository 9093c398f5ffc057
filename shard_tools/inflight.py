"""A map over an executor that keeps a bounded number of calls in flight.

Inputs are drawn lazily, only when a call's slot frees, so a long (or streamed) input never becomes a long queue of
submitted work and results: memory stays bounded by ``limit`` calls and their results, and the workers stay busy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Literal, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], limit: int,
                order: Literal["input", "completion"] = "input") -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for every item, computed on ``pool`` with at most ``limit`` calls submitted ahead of the
    caller; in input order, or as calls complete (``order="completion"``: a slow call does not hold back the rest).

    A call's exception is raised when its result is due. When the caller stops early, or a call fails, the calls
    not yet started are cancelled."""
    limit = max(1, limit)
    it = iter(items)
    if order == "input":
        queue: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in it:
                queue.append((item, pool.submit(fn, item)))
                if len(queue) >= limit:
                    break
            while queue:
                item, fut = queue.popleft()
                for nxt in it:  # the next call starts before this one's result is awaited
                    queue.append((nxt, pool.submit(fn, nxt)))
                    break
                yield item, fut.result()
        except BaseException:
            for _, fut in queue:
                fut.cancel()
            raise
        return
    pending: dict[Future[R], T] = {}
    try:
        for item in it:
            pending[pool.submit(fn, item)] = item
            if len(pending) >= limit:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                result = fut.result()
                for nxt in it:
                    pending[pool.submit(fn, nxt)] = nxt
                    break
                yield item, result
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
