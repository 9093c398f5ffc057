"""The shard writer: the background writer gives the same bytes as writing inline, and its failures surface."""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import pytest

from shard_tools.writer import ShardWriter


def _samples(n: int = 6):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield f"chip{i:03d}", {"key": f"chip{i:03d}"}, {
            "s1grd": rng.integers(-3000, 0, size=(4, 64, 64), dtype=np.int16),
            "esawc": rng.integers(0, 100, size=(1, 64, 64), dtype=np.uint8),
        }


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "m3leo-shard-writer"]


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_background_writes_the_same_bytes(tmp_path, compress):
    out = {}
    for background in (False, True):
        path = tmp_path / f"{background}.tar"
        with open(path, "wb") as f, ShardWriter(f, compress, writeback=4096, background=background) as w:
            ranges = [w.add_sample(k, m, a) for k, m, a in _samples()]
            nbytes, sha = w.close()
        data = path.read_bytes()
        assert len(data) == nbytes and hashlib.sha256(data).hexdigest() == sha
        out[background] = (data, ranges)
    assert out[True] == out[False]
    assert not _writer_threads()


class _FailingFile(io.BytesIO):
    def __init__(self, fail_after: int):
        super().__init__()
        self.fail_after = fail_after

    def write(self, b) -> int:
        if self.tell() + len(b) > self.fail_after:
            raise OSError(28, "No space left on device")
        return super().write(b)


def test_background_failure_surfaces_and_the_thread_ends():
    w = ShardWriter(_FailingFile(100_000), background=True)
    with pytest.raises(OSError, match="No space left on device"):
        with w:
            for k, m, a in _samples(20):
                w.add_sample(k, m, a)
            w.close()
    assert not _writer_threads()


def test_abort_stops_the_thread_without_writing_the_rest():
    f = io.BytesIO()
    with pytest.raises(RuntimeError, match="bad chip"):
        with ShardWriter(f, background=True) as w:
            for k, m, a in _samples(3):
                w.add_sample(k, m, a)
            raise RuntimeError("bad chip")
    assert not _writer_threads()
    assert len(f.getvalue()) <= w.pos
