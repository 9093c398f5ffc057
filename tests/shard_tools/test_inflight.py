"""The bounded-in-flight map: order, the bound on submitted calls, lazy input, errors and early stops."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shard_tools.inflight import bounded_map


class _Counting:
    """A function that records how many of its calls run at once, and the inputs drawn so far."""

    def __init__(self, delays: dict[int, float] | None = None):
        self.delays = delays or {}
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.calls: list[int] = []

    def __call__(self, x: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(x)
        time.sleep(self.delays.get(x, 0.002))
        with self.lock:
            self.running -= 1
        return x * x


@pytest.mark.parametrize("order", ["input", "completion"])
def test_every_item_once_with_its_result(order):
    fn = _Counting()
    with ThreadPoolExecutor(8) as pool:
        got = list(bounded_map(pool, fn, range(50), 3, order=order))
    assert sorted(got) == [(x, x * x) for x in range(50)]
    if order == "input":
        assert [x for x, _ in got] == list(range(50))
    assert fn.most <= 4  # the bound (+ the call whose result the caller awaits, in input order)


def test_completion_order_lets_fast_calls_pass_a_slow_one():
    fn = _Counting({0: 0.3})
    with ThreadPoolExecutor(4) as pool:
        got = [x for x, _ in bounded_map(pool, fn, range(6), 4, order="completion")]
    assert got[-1] == 0 and sorted(got) == list(range(6))


@pytest.mark.parametrize("order", ["input", "completion"])
def test_input_is_drawn_only_as_slots_free(order):
    drawn: list[int] = []

    def items():
        for x in range(100):
            drawn.append(x)
            yield x

    with ThreadPoolExecutor(2) as pool:
        results = bounded_map(pool, _Counting(), items(), 2, order=order)
        next(results)
        assert len(drawn) <= 3
        results.close()


@pytest.mark.parametrize("order", ["input", "completion"])
def test_error_is_raised_and_unstarted_calls_are_cancelled(order):
    fn = _Counting({0: 0.05})

    def failing(x: int) -> int:
        if x == 0:
            time.sleep(0.05)
            raise ValueError("chip 0 is broken")
        return fn(x)

    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="chip 0 is broken"):
        for _ in bounded_map(pool, failing, range(20), 5, order=order):
            pass
    assert len(fn.calls) < 19
