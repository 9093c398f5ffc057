"""The ``small_stats`` fixture of the device transforms tests."""

from __future__ import annotations

import pytest
from transforms_cases import SMALL, _pattern, _stats


@pytest.fixture(scope="module")
def small_stats():
    b = _pattern(4)
    return _stats(SMALL, {n: b[n].numpy() for n in ("sar", "opt", "lab", "crs")})
