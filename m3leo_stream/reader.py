"""The reader: a map-style dataset that turns planned sample references into a batch of raw arrays.

Runs inside DataLoader workers and does I/O and decoding only. For a batch it gathers the byte ranges of the
requested members from the index, coalesces ranges that are adjacent in a shard into one request, keeps several
requests in flight on a thread pool, retries transient storage errors with backoff (``storage.with_retries``), and
decodes ``.npy`` members (no pickle) straight into the batch arrays.

With a band selection (``bands``: storage indices per modality, what the run's device transforms use) only those
bands are read: a member is an uncompressed ``(C, H, W)`` ``.npy``, so each band is a contiguous byte range after the
header; the reader fetches the header (still checked: dtype, shape, order) and the runs of selected bands, coalesced
like whole members. Compressed members cannot be read in part: they are read whole, decoded, and the selected bands
copied into the batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from . import shard_format as sf
from .index import IndexArrays, default_cache_dir
from .modalities import BANDS_KEY, Modality
from .node_cache import NodeCache, NodePlan
from .planner import PAD_FLAG
from .storage import (
    IOCounters,
    RetryPolicy,
    connection_pool,
    get_fs,
    is_local,
    is_local_url,
    join,
    single_attempt,
    with_retries,
)

log = logging.getLogger(__name__)

IO_KEY = "_io"
"""Batch key carrying the worker's I/O counters for this batch; the loader pops it before users see the batch."""


class UnreadableSample(OSError):
    """A member stayed unreadable after the retry deadline (or is corrupt)."""


@dataclass
class ReaderConfig:
    """How members are fetched."""

    # requests in flight per worker (None: LOCAL_IO_THREADS on local disks, REMOTE_IO_THREADS on object stores, where
    # each request waits out a first-byte latency); with a node cache its prefetcher keeps as many in flight ahead
    io_threads: int | None = None
    coalesce_gap: int = 64 * 1024  # merge ranges of one shard separated by at most this many bytes
    max_request: int = 64 * 1024 * 1024  # never merge into requests larger than this
    on_unreadable: Literal["fail", "substitute"] = "fail"  # "substitute": a sample of the same region takes its place
    max_substitutes: int = 3
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # local shards: read a batch's requests on the calling thread (thread mode, where several batches are read
    # at once already; more threads than cores there only contend)
    inline_local: bool = False
    # batch arrays kept for reuse when read in this process: at most as many as can be alive at once (the batches
    # read ahead plus those the consumer holds); more are allocated afresh and freed
    pooled_batches: int = 4
    # allocate those arrays in pinned (page-locked) memory when CUDA is available, so that the host→device copy
    # reads them directly instead of pinning a second copy; whoever copies them asynchronously must ``fence`` them
    pinned: bool = False
    # check every member read against the index's digests (where the shard root has them); a mismatch is read
    # again once (it may have been corrupted in transit), then is an unreadable sample
    verify: bool = True
    # a node-local cache of the samples' byte ranges (:mod:`m3leo_stream.node_cache`) of at most this many bytes
    # under ``cache_dir`` (0: none); ``cache_prefetch`` samples of the plan are fetched into it ahead of need
    cache_bytes: int = 0
    cache_dir: str | None = None
    cache_prefetch: int = 32

    def __post_init__(self) -> None:
        if self.on_unreadable not in ("fail", "substitute"):
            raise ValueError(f"on_unreadable must be 'fail' or 'substitute', not {self.on_unreadable!r}")
        if isinstance(self.retry, Mapping):
            self.retry = RetryPolicy(**self.retry)


LOCAL_IO_THREADS = 8
"""Default requests in flight per worker on local disks (thread mode reads local shards on the read-ahead threads)."""
REMOTE_IO_THREADS = 16
"""Default requests in flight per worker on object stores: a ranged GET of ≈1 MB takes its first-byte latency
(≈30 ms on S3) plus ≈10 ms at 100 MB/s, so one request in flight moves ≈25 MB/s and 16 move ≈400 MB/s."""

_MEMBER, _HEADER, _BANDS = "member", "header", "bands"  # what a part of a request is
_MAX_HEADER = 65536  # a member's ``.npy`` header is at most this long (format 1.0 writes < 64 KiB)
try:
    _IOV_MAX = max(16, int(os.sysconf("SC_IOV_MAX")))
except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
    _IOV_MAX = 1024


class _Part(NamedTuple):
    """A byte range of one member: the whole member, its ``.npy`` header (with verification, from the chunk-digest
    member before it on), or a run of consecutive selected bands that lands at ``first:stop`` of the batch slot's
    (selected) bands."""

    slot: int
    name: str
    off: int
    nbytes: int
    kind: str = _MEMBER
    first: int = 0
    stop: int = 0
    check: tuple[int, ...] = ()  # from the index: the member's digest, or (header) that of its chunk digests
    skip: int = 0  # header: bytes before the ``.npy`` header (the chunk-digest member, its padding, a tar header)


class _Fetched(NamedTuple):
    """A request's bytes (None when they went straight into the batch arrays, whose chunks per part are then in
    ``chunks``), and the parts found wrong as (slot, member, what)."""

    data: bytes | bytearray | memoryview | None
    bad: list[tuple[int, str, str]]
    chunks: list[list[Any]] | None = None

    def view(self) -> memoryview:
        """The request's bytes (a request read straight into the batch arrays has none: see ``chunks``)."""
        if self.data is None:
            raise ValueError("the request was read into the batch arrays")
        return memoryview(self.data)


@dataclass
class _Request:
    shard: int
    start: int
    stop: int
    parts: list[_Part]


def _header_len(nbytes: int, m: Modality) -> int | None:
    """The ``.npy`` header length of an uncompressed member of ``nbytes`` (its data are the last ``m.nbytes``), or
    None when that is no plausible header (the member does not fit the registry: read whole, the decode says why)."""
    h = nbytes - m.nbytes
    return h if 10 <= h <= _MAX_HEADER else None


def member_bound(m: Modality, compressed: bool) -> int:
    """The most bytes a member of ``m`` can honestly take: its array and the largest ``.npy`` header, and with
    compression zstd's worst case (a few bytes per 128 KiB block) on top."""
    return m.nbytes + _MAX_HEADER + ((m.nbytes >> 7) + 4096 if compressed else 0)


def _check_header(head: bytes | bytearray | memoryview, m: Modality) -> None:
    """The ``.npy`` header of a member read in parts must describe exactly the registry's array."""
    dtype, shape, fortran, start = sf.npy_header(head)
    if start != len(head):
        raise sf.FormatError(f".npy header of {start} bytes where the member's size leaves {len(head)}: array "
                             f"{shape} {dtype}, registry says {m.shape} {m.np_dtype}")
    if dtype != m.np_dtype or shape != m.shape or fortran:
        raise sf.FormatError(f"array {shape} {dtype}{' (Fortran order)' if fortran else ''}, registry says "
                             f"{m.shape} {m.np_dtype}")


def _header_errors(heads: Iterable[tuple[int, str, Any]], mods: Mapping[str, Modality]) -> list[tuple[int, str, str]]:
    """(slot, member, what is wrong) for each ``.npy`` header of a member read in parts that does not describe
    the registry's array."""
    bad = []
    for slot, name, head in heads:
        try:
            _check_header(head, mods[name])
        except sf.FormatError as e:
            bad.append((slot, name, str(e)))
    return bad


def _band_runs(selected: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive storage indices: (first band, last band + 1, position in the selection)."""
    runs: list[tuple[int, int, int]] = []
    for pos, b in enumerate(selected):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1, runs[-1][2])
        else:
            runs.append((b, b + 1, pos))
    return runs


def _planes(view: memoryview, m: Modality, n: int) -> list[memoryview]:
    """The ``n`` band planes of a run of consecutive bands of ``m``."""
    band = m.nbytes // len(m.bands)
    return [view[i * band:(i + 1) * band] for i in range(n)]


def _preadv_all(fd: int, iov: list[Any], offset: int) -> int:
    """``os.preadv`` of ``iov`` at ``offset`` in chunks of at most IOV_MAX buffers; bytes read (short at EOF)."""
    got = 0
    for i in range(0, len(iov), _IOV_MAX):
        chunk = iov[i:i + _IOV_MAX]
        want = sum(memoryview(b).nbytes for b in chunk)
        k = os.preadv(fd, chunk, offset + got)
        got += k
        if k != want:
            break
    return got


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over planned references (index row numbers, padding flagged with ``PAD_FLAG``).

    ``__getitems__`` returns a whole collated batch (dict of tensors), so the DataLoader's ``collate_fn`` must be
    :func:`passthrough`.

    ``bands`` maps a modality to the storage indices of the bands to read (the others are not fetched; modalities
    not named: all bands). A batch's tensor of that modality is then ``(B, len(selected), H, W)`` and
    ``batch["bands"][modality]`` names the bands it carries, in storage order.

    ``optional`` modalities may be absent from a sample (the planner kept it): nothing is read for them, their slot
    holds zeros, and ``batch["<modality>_present"]`` (bool, per sample; there for every modality) is False. A
    required member that is absent is an error naming the shard and key.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, index: IndexArrays,
                 modalities: Sequence[Modality], *, compressed: bool,
                 substitutes: Mapping[int, np.ndarray] | None = None,
                 config: ReaderConfig | None = None, bands: Mapping[str, Sequence[int]] | None = None,
                 optional: Sequence[str] = ()):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.index = index
        self.modalities = list(modalities)
        self.optional = frozenset(optional)
        unknown = sorted(self.optional - {m.name for m in self.modalities})
        if unknown:
            raise ValueError(f"optional modalities {unknown} are not read (reading {[m.name for m in modalities]})")
        self.bands = _band_selection(self.modalities, bands)  # modality -> selected storage indices
        # runs of consecutive selected bands; None: all bands, the member is read whole
        self._runs = {m.name: None if len(self.bands[m.name]) == len(m.bands) else _band_runs(self.bands[m.name])
                      for m in self.modalities}
        self.compressed = compressed
        self.substitutes = dict(substitutes or {})  # region code -> candidate rows
        self.config = config or ReaderConfig()
        self._chunked = self._chunk_verified()
        self.node_plan: NodePlan | None = None  # what the node cache evicts and prefetches by
        if self.config.cache_bytes > 0:
            unchecked = [m.name for m in self.modalities if m.name not in self.index.checksums]
            if not self.config.verify or unchecked:
                raise ValueError("the node cache serves only bytes it has checked against the index's digests: it "
                                 "needs verify=True and a shard root with member digests (format version 2)"
                                 + (f"; the index has none for {unchecked}" if unchecked else ""))
        self._pid: int | None = None
        self._state_lock = threading.Lock()
        self._buffers = _BufferPool(self.config.pooled_batches, pinned=self.config.pinned)

    def _chunk_verified(self) -> frozenset[str]:
        """The modalities read in part whose members are verified, through their chunk digests."""
        out = set()
        partial = read_in_part(self.modalities, self.bands, self.compressed)
        for m in self.modalities:
            if m.name not in partial or not self.config.verify or m.name not in self.index.checksums:
                continue
            if m.name not in self.index.chunk_checksums:
                raise ValueError(f"reading some bands of {m.name}, but the index arrays lack "
                                 f"{sf.chunks_checksum_column(m.name)} (read that column from index.parquet too)")
            out.add(m.name)
        return frozenset(out)

    def __getstate__(self) -> dict[str, Any]:
        """For worker processes: per-process resources (locks, pools, files, buffers) are made anew there."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_state_lock", "_buffers", "_proc", "node_plan")}
        state["node_plan"] = None  # it follows the training thread's sampler: without it the cache does not prefetch
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._state_lock = threading.Lock()
        self._buffers = _BufferPool(self.config.pooled_batches)  # never pinned in another process

    # -- per-process resources, created lazily after fork/spawn --------------------------------------------------
    def _state(self) -> dict[str, Any]:
        with self._state_lock:
            if self._pid != os.getpid():
                self._proc = self._open_state()
                self._pid = os.getpid()
            return self._proc

    def _open_state(self) -> dict[str, Any]:
        # a private filesystem instance: clients (sockets, event loops) must not be shared across processes; with a
        # connection for every request this process can have in flight
        opts = connection_pool(self.url, single_attempt(self.url, self.storage_options), self.requests_in_flight())
        fs, path = get_fs(self.url, {**opts, "skip_instance_cache": True})
        if isinstance(getattr(fs, "retries", None), int):
            fs.retries = 1  # s3fs would retry silently; our policy retries (with a deadline) and counts
        st = {
            "fs": fs, "path": path, "local": is_local(fs),
            "pool": ThreadPoolExecutor(self.io_threads(), thread_name_prefix="m3leo-read"),
            "fds": _FdCache(),
        }
        if self.config.cache_bytes > 0:
            st["cache"] = NodeCache(self.cache_path(), self.config.cache_bytes, _Entries(self), self.node_plan,
                                    prefetch=self.config.cache_prefetch, threads=self.io_threads())
            weakref.finalize(self, st["cache"].close)
        return st

    def io_threads(self) -> int:
        """Requests in flight per worker: ``io_threads``, or by default as suits the storage (local or remote)."""
        if self.config.io_threads is not None:
            return max(1, int(self.config.io_threads))
        return LOCAL_IO_THREADS if is_local_url(self.url) else REMOTE_IO_THREADS

    def requests_in_flight(self) -> int:
        """The most storage requests this process can have in flight: ``io_threads`` for batches, and as many for
        the node cache's prefetcher when there is a cache."""
        return 2 * self.io_threads() if self.config.cache_bytes > 0 else self.io_threads()

    def cache_path(self) -> str:
        """Where this reader's node cache lives: a directory per shard root and what is read of each sample (the
        entries are that sample's requests), under ``cache_dir``."""
        ix, cfg = self.index, self.config
        fingerprint = hashlib.sha256(json.dumps({
            "url": self.url, "samples": len(ix.key), "shards": list(map(str, ix.shard_names)),
            "read": {name: list(b) for name, b in self.bands.items()}, "compressed": self.compressed,
            "gap": cfg.coalesce_gap, "max_request": cfg.max_request, "chunked": sorted(self._chunked),
        }, sort_keys=True).encode()).hexdigest()[:24]
        return os.path.join(cfg.cache_dir or default_cache_dir(), "node-cache", fingerprint)

    def cache(self) -> NodeCache | None:
        """This process's node cache (None when ``cache_bytes`` is 0)."""
        return self._state().get("cache")

    def __len__(self) -> int:
        return len(self.index.key)

    def __getitem__(self, ref: int) -> dict[str, Any]:
        batch = self.__getitems__([ref])
        return {k: (v[0] if k not in (IO_KEY, BANDS_KEY) else v) for k, v in batch.items()}

    def _array_specs(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of each array ``__getitems__`` allocates for a batch of ``n`` (the selected bands only)."""
        return {m.name: ((n, len(self.bands[m.name]), *m.shape[1:]), m.np_dtype) for m in self.modalities}

    def batch_nbytes(self, n: int) -> int:
        """Host bytes one batch of ``n`` holds: the arrays as allocated (pinned ones are rounded up to a power of
        two by torch's pinned-memory allocator) and the per-sample metadata."""
        arrays = sum(self._buffers.nbytes(shape, dtype) for shape, dtype in self._array_specs(n).values())
        return arrays + n * (8 + 8 + 8 + 1 + 13 + len(self.modalities))  # region, lon, lat, valid, key, present

    def set_pooled_batches(self, n: int) -> None:
        """Keep at most ``n`` batches of arrays for reuse (the batches alive at once)."""
        self.config = replace(self.config, pooled_batches=int(n))
        self._buffers.keep = int(n)

    def fence(self, tensors: Iterable[Any], event: Any) -> None:
        """The batch arrays behind ``tensors`` are being read by an asynchronous copy that completes with ``event``
        (anything with ``query()``, e.g. a ``torch.cuda.Event`` recorded after the copy): they are not handed out
        again, nor freed, before ``event.query()`` is true."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel():
                self._buffers.fence(t.data_ptr(), event)

    def __getitems__(self, refs: Sequence[int]) -> dict[str, Any]:
        t0 = time.perf_counter()
        st = self._state()
        counters = IOCounters()
        ref = np.asarray(refs, dtype=np.int64)
        valid = (ref & PAD_FLAG) == 0
        rows = ref & ~PAD_FLAG
        n = len(rows)
        shared = torch.utils.data.get_worker_info() is not None
        tensors = {name: _batch_tensor(shape, dtype, shared) if shared
                   else torch.from_numpy(self._buffers.get(shape, dtype))
                   for name, (shape, dtype) in self._array_specs(n).items()}
        out = {name: t.numpy() for name, t in tensors.items()}
        rows = self._fill(rows, out, st, counters)
        ix = self.index
        present = {m.name: self._present(m.name, rows) for m in self.modalities}
        for name in self.optional:
            if not present[name].all():
                out[name][~present[name]] = 0  # nothing was read there (and a reused buffer holds old data)
        small = _pinned_tensor if self._buffers.pinned and not shared else _tensor
        batch: dict[str, Any] = dict(tensors)
        for name, p in present.items():
            batch[f"{name}_present"] = small(p)
        batch["key"] = [k.decode() for k in ix.key[rows]]
        batch["region"] = small(ix.region[rows].astype(np.int64))
        batch["lon"] = small(ix.lon[rows])
        batch["lat"] = small(ix.lat[rows])
        batch["valid"] = small(valid)
        batch[BANDS_KEY] = {m.name: [m.bands[i] for i in self.bands[m.name]] for m in self.modalities}
        batch[IO_KEY] = io_tensor(counters, time.perf_counter() - t0)
        return batch

    def _present(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` has a ``name`` member, from the index."""
        return (self.index.offsets[name][rows] >= 0) & (self.index.nbytes[name][rows] >= 0)

    # -- reading ---------------------------------------------------------------------------------------------
    def _fill(self, rows: np.ndarray, out: dict[str, np.ndarray], st: dict[str, Any],
              counters: IOCounters) -> np.ndarray:
        """Read every slot; on final failure substitute (if configured) and retry those slots."""
        rows = rows.copy()
        pending = np.arange(len(rows))
        attempt = 0
        while len(pending):
            failed = self._read_slots(rows, pending, out, st, counters)
            if not failed:
                break
            if self.config.on_unreadable != "substitute" or attempt >= self.config.max_substitutes:
                slot, err = failed[0]
                raise err
            attempt += 1
            for slot, err in failed:
                old = int(rows[slot])
                rows[slot] = self._substitute(old, attempt)
                counters.substitutions += 1
                log.warning("substituting %s (region %s) with %s after: %s", self.index.key[old].decode(),
                            int(self.index.region[old]), self.index.key[rows[slot]].decode(), err)
            pending = np.array([s for s, _ in failed], dtype=np.int64)
        return rows

    def _substitute(self, row: int, attempt: int) -> int:
        cands = self.substitutes.get(int(self.index.region[row]))
        if cands is None or len(cands) == 0:
            raise UnreadableSample(f"no substitute available for {self.index.key[row].decode()}")
        h = zlib.crc32(self.index.key[row] + b"/%d" % attempt)
        pick = int(cands[h % len(cands)])
        if pick == row and len(cands) > 1:
            pick = int(cands[(h + 1) % len(cands)])
        return pick

    def _plan_requests(self, rows: np.ndarray, slots: np.ndarray) -> list[_Request]:
        ix, cfg = self.index, self.config
        parts = []
        for slot in slots:
            row = int(rows[slot])
            shard = int(ix.shard[row])
            for m in self.modalities:
                off, nb = int(ix.offsets[m.name][row]), int(ix.nbytes[m.name][row])
                if (off < 0 or nb < 0) and m.name in self.optional:
                    continue  # absent: the slot is zeroed and flagged after the batch is read
                if off < 0 or nb < 0:
                    raise UnreadableSample(f"{ix.shard_names[ix.shard[row]]}: key {ix.key[row].decode()} has no "
                                           f"{m.name} member (the index and the plan disagree)")
                runs = self._runs[m.name]
                hlen = None if runs is None or self.compressed else _header_len(nb, m)
                sums = ix.checksums.get(m.name) if self.config.verify else None
                if runs is None or hlen is None:  # all bands, compressed, or a size unlike the registry's: whole member
                    check = () if sums is None else (int(sums[row]),)
                    parts.append((shard, off, nb, int(slot), m.name, _MEMBER, 0, 0, check, 0))
                    continue
                if m.name in self._chunked:  # the header part starts at the chunk digests, which check the rest
                    start = sf.chunk_digests_range(off, len(m.bands))[0]
                    parts.append((shard, start, off + hlen - start, int(slot), m.name, _HEADER, 0, 0,
                                  (int(ix.chunk_checksums[m.name][row]),), off - start))
                else:
                    parts.append((shard, off, hlen, int(slot), m.name, _HEADER, 0, 0, (), 0))
                band = m.nbytes // len(m.bands)
                for b0, b1, pos in runs:
                    parts.append((shard, off + hlen + b0 * band, (b1 - b0) * band, int(slot), m.name, _BANDS, pos,
                                  pos + b1 - b0, (), 0))
        parts.sort()
        requests: list[_Request] = []
        for shard, off, nb, slot, name, kind, first, stop, check, skip in parts:
            part = _Part(slot, name, off, nb, kind, first, stop, check, skip)
            last = requests[-1] if requests else None
            if (last is not None and last.shard == shard and off - last.stop <= cfg.coalesce_gap
                    and off + nb - last.start <= cfg.max_request and off >= last.start):
                last.stop = max(last.stop, off + nb)
                last.parts.append(part)
            else:
                requests.append(_Request(shard, off, off + nb, [part]))
        return requests

    def _tasks(self, requests: list[_Request]) -> list[list[_Request]]:
        """Requests grouped so that the parts of a member read in part and verified through its chunk digests are
        fetched, and checked, together (by one thread); every other request is a task of its own."""
        group = list(range(len(requests)))

        def find(i: int) -> int:
            while group[i] != i:
                group[i] = group[group[i]]
                i = group[i]
            return i

        first: dict[tuple[int, str], int] = {}
        for i, req in enumerate(requests):
            for p in req.parts:
                if p.kind != _MEMBER and p.name in self._chunked:
                    j = first.setdefault((p.slot, p.name), i)
                    group[find(i)] = find(j)
        tasks: dict[int, list[_Request]] = {}
        for i, req in enumerate(requests):
            tasks.setdefault(find(i), []).append(req)
        return list(tasks.values())

    def _implausible(self, rows: np.ndarray, slots: np.ndarray) -> dict[int, Exception]:
        """Slots with a member whose size in the index cannot be true for the registry's array (uncompressed: the
        array plus an ``.npy`` header; compressed: zstd's worst case on top): refused before anything is allocated
        or read, so a corrupt index cannot make the reader allocate what it claims."""
        ix = self.index
        bad: dict[int, Exception] = {}
        for m in self.modalities:
            nb = ix.nbytes[m.name][rows[slots]].astype(np.int64)
            limit = member_bound(m, self.compressed)
            for slot, n in zip(slots[nb > limit], nb[nb > limit]):
                row = int(rows[slot])
                bad[int(slot)] = UnreadableSample(
                    f"{ix.shard_names[ix.shard[row]]} key {ix.key[row].decode()} member {m.name}: the index says "
                    f"{int(n)} bytes, more than a {m.shape} {m.dtype} array can take ({limit}); corrupt index?")
            if ix.shard_bytes is None:
                continue
            r = rows[slots]
            end = ix.offsets[m.name][r].astype(np.int64) + nb
            size = ix.shard_bytes[ix.shard[r]]
            for slot, e, n in zip(slots[end > size], end[end > size], size[end > size]):
                row = int(rows[slot])
                bad.setdefault(int(slot), UnreadableSample(
                    f"{ix.shard_names[ix.shard[row]]} key {ix.key[row].decode()} member {m.name}: the index says "
                    f"it ends at byte {int(e)}, the shard has {int(n)} (manifest); corrupt index?"))
        return bad

    def _read_slots(self, rows: np.ndarray, slots: np.ndarray, out: dict[str, np.ndarray], st: dict[str, Any],
                    counters: IOCounters) -> list[tuple[int, Exception]]:
        implausible = self._implausible(rows, slots)
        if implausible:
            slots = np.array([s for s in slots if int(s) not in implausible], dtype=np.int64)
        if st.get("cache") is not None:  # a task per sample: the cache's entries
            tasks = [self._plan_requests(rows, np.array([s])) for s in slots]
            read = self._read_cached
        else:
            tasks = self._tasks(self._plan_requests(rows, slots))
            read = self._read_task
        if st["local"] and self.config.inline_local:
            futures = [_run_now(read, task, rows, st, counters, out) for task in tasks]
        else:
            futures = [st["pool"].submit(read, task, rows, st, counters, out) for task in tasks]
        failed: dict[int, Exception] = dict(implausible)
        mods = {m.name: m for m in self.modalities}
        fetched: list[tuple[_Request, bytes | bytearray]] = []
        for task, fut in zip(tasks, futures):
            try:
                results = fut.result()
            except Exception as e:  # noqa: BLE001 - reported per slot below
                for part in (p for req in task for p in req.parts):  # each slot's error names its key and member
                    key = self.index.key[int(rows[part.slot])].decode()
                    why = str(e) or type(e).__name__
                    failed.setdefault(part.slot, UnreadableSample(f"key {key} member {part.name}: {why}"))
                continue
            for req, (data, bad, _) in zip(task, results):
                for slot, name, msg in bad:
                    key = self.index.key[int(rows[slot])].decode()
                    failed.setdefault(slot, UnreadableSample(
                        f"{self.index.shard_names[req.shard]} key {key} member {name}: {msg}"))
                if data is not None:  # else read straight into the batch arrays
                    fetched.append((req, data))
        for req, data in fetched:
            mv = memoryview(data)
            for slot, name, off, nb, kind, first, stop, *_ in req.parts:
                if slot in failed:
                    continue
                row = int(rows[slot])
                where = f"{self.index.shard_names[req.shard]} key {self.index.key[row].decode()} member {name}"
                view = mv[off - req.start:off - req.start + nb]
                m = mods[name]
                try:
                    if kind == _BANDS:
                        out[name][slot, first:stop] = np.frombuffer(view, dtype=m.np_dtype).reshape(
                            stop - first, *m.shape[1:])
                        continue
                    if kind == _HEADER:  # checked by the fetch
                        continue
                    arr = sf.decode_array(view, compressed=self.compressed, where=where)
                    if arr.shape != m.shape or arr.dtype != m.np_dtype:
                        raise sf.FormatError(f"{where}: array {arr.shape} {arr.dtype}, registry says {m.shape} "
                                             f"{m.np_dtype}")
                    # a member read whole: all bands, or (compressed members) the selected ones copied out
                    out[name][slot] = arr if self._runs[name] is None else arr[list(self.bands[name])]
                except sf.FormatError as e:
                    failed[slot] = UnreadableSample(str(e))
        return sorted(failed.items())

    def _read_cached(self, task: list[_Request], rows: np.ndarray, st: dict[str, Any], counters: IOCounters,
                     out: dict[str, np.ndarray]) -> list[_Fetched]:
        """One sample's requests through the node cache (which checks what it serves), else read directly."""
        data = st["cache"].get(int(rows[task[0].parts[0].slot]), counters)
        if data is None:
            return self._read_task(task, rows, st, counters, out)
        return self._split(task, data)

    def _split(self, task: list[_Request], data: bytes | bytearray) -> list[_Fetched]:
        """A cache entry (a sample's requests end to end) as the requests' fetched bytes."""
        mods = {m.name: m for m in self.modalities}
        out, pos, mv = [], 0, memoryview(data)
        for req in task:
            chunk = mv[pos:pos + req.stop - req.start]
            pos += req.stop - req.start
            heads = [(p.slot, p.name, chunk[p.off - req.start + p.skip:p.off - req.start + p.nbytes])
                     for p in req.parts if p.kind == _HEADER]
            out.append(_Fetched(chunk, _header_errors(heads, mods)))
        return out

    def _read_task(self, task: list[_Request], rows: np.ndarray, st: dict[str, Any], counters: IOCounters,
                   out: dict[str, np.ndarray]) -> list[_Fetched]:
        """Fetch a task's requests and check each part against its digests; when some differ the task is read once
        more (bytes can be corrupted in transit), and parts that still differ are reported as bad."""
        direct = st["local"] and not self.compressed
        fetch = self._fetch_into if direct else self._fetch
        got = [fetch(req, st, counters, out) for req in task]
        wrong = self._mismatched(task, got)
        if not wrong:
            return got
        counters.checksum_failures += len(wrong)
        counters.retries += 1
        shard = self.index.shard_names[task[0].shard]
        for part, what in wrong:
            key = self.index.key[int(rows[part.slot])].decode()
            log.warning("%s key %s member %s: %s; reading it again", shard, key, part.name, what)
        got = [fetch(req, st, counters, out) for req in task]
        still = self._mismatched(task, got)
        if not still:
            log.warning("%s: the second read matches the index (corrupted in transit)", shard)
            return got
        why = "(read twice; the shard or its index is corrupt)"
        bad = [(part.slot, part.name, f"{what} {why}") for part, what in still]
        return [got[0]._replace(bad=got[0].bad + bad), *got[1:]]

    def _mismatched(self, task: list[_Request], got: list[_Fetched]) -> list[tuple[_Part, str]]:
        """The parts of a fetched task whose bytes do not match the index's digests (a member read whole: its
        digest; read in part: its chunk digests, which match the index's, then its header and each band against
        them), with what differs; one per member."""
        mods = {m.name: m for m in self.modalities}
        bad = {slot for g in got for slot, _, _ in g.bad}
        placed = []  # (part, its bytes: one buffer, or one per band for a run)
        for req, g in zip(task, got):
            for i, part in enumerate(req.parts):
                if part.slot in bad or (part.kind == _MEMBER and not part.check) or \
                        (part.kind != _MEMBER and part.name not in self._chunked):
                    continue
                if g.chunks is not None:
                    chunks = g.chunks[i]
                else:
                    view = g.view()[part.off - req.start:part.off - req.start + part.nbytes]
                    chunks = _planes(view, mods[part.name], part.stop - part.first) if part.kind == _BANDS else [view]
                placed.append((part, chunks))
        wrong: dict[tuple[int, str], tuple[_Part, str]] = {}
        digests: dict[tuple[int, str], np.ndarray] = {}  # the chunk digests of members read in part, once checked
        for part, chunks in sorted(placed, key=lambda pc: pc[0].kind != _HEADER):
            member = (part.slot, part.name)
            if member in wrong:
                continue
            m = mods[part.name]
            if part.kind == _MEMBER:
                have, want, what = sf.digest(*chunks), part.check[0], "bytes"
            elif part.kind == _HEADER:
                head = memoryview(chunks[0])
                table = head[:8 * (1 + len(m.bands))]
                have, want, what = sf.digest(table), part.check[0], "chunk digests"
                if have == want:
                    digests[member] = np.frombuffer(table, dtype="<u8")
                    have, want, what = sf.digest(head[part.skip:]), int(digests[member][0]), ".npy header"
            else:
                if member not in digests:
                    continue  # its header part failed
                for j, c in enumerate(chunks):
                    band = self.bands[part.name][part.first + j]
                    have, want, what = sf.digest(c), int(digests[member][1 + band]), f"band {m.bands[band]}"
                    if have != want:
                        break
            if have != want:
                wrong[member] = (part, f"checksum mismatch: its {what} hash to {have:016x}, expected {want:016x}")
        return list(wrong.values())

    def _fetch_into(self, req: _Request, st: dict[str, Any], counters: IOCounters,
                    out: dict[str, np.ndarray]) -> _Fetched:
        """Local, uncompressed shards: ``preadv`` per request scattering each member's array bytes (or each run of
        its selected bands) straight into its batch slot (the ``.npy`` headers and the gaps go to scratch; headers
        are checked after). Falls back to ``_fetch`` when the member sizes do not match the registry. Reports the
        members whose header was wrong, and where each part's bytes went."""
        mods = {m.name: m for m in self.modalities}
        iov: list[Any] = []
        headers = []
        chunks: list[list[Any]] = []
        bufs: list[bytearray | memoryview]
        pos = req.start
        for slot, name, off, nb, kind, first, stop, _, skip in req.parts:
            if off < pos:
                return self._fetch(req, st, counters, out)
            if kind == _BANDS:
                head, bufs = None, [out[name][slot, first:stop].data.cast("B")]
                chunks.append([out[name][slot, b].data.cast("B") for b in range(first, stop)])
            elif kind == _HEADER:
                head = bytearray(nb)
                bufs = [head]
                chunks.append(bufs)
            else:
                hlen = _header_len(nb, mods[name])
                if hlen is None or self._runs[name] is not None:  # the decode names what is wrong
                    return self._fetch(req, st, counters, out)
                head = bytearray(hlen)
                bufs = [head, out[name][slot].data.cast("B")]
                chunks.append(bufs)
            if off > pos:
                iov.append(bytearray(off - pos))
            iov += bufs
            if head is not None:
                headers.append((slot, name, memoryview(head)[skip:]))
            pos = off + nb
        name = self.index.shard_names[req.shard]
        path = join(st["path"], name)
        want = req.stop - req.start
        with st["fds"].open(path) as fd:
            got = _preadv_all(fd, iov, req.start)
        if got != want:
            return self._fetch(req, st, counters, out)
        counters.requests += 1
        counters.bytes += want
        return _Fetched(None, _header_errors(headers, mods), chunks)

    def _fetch(self, req: _Request, st: dict[str, Any], counters: IOCounters,
               out: dict[str, np.ndarray] | None = None) -> _Fetched:
        name = self.index.shard_names[req.shard]
        path = join(st["path"], name)
        nbytes = req.stop - req.start
        what = f"{join(self.url, name)} bytes {req.start}-{req.stop}"
        data: bytes | bytearray
        if st["local"]:
            data = self._pread(path, req.start, nbytes, st)
        else:
            def op() -> bytes:
                data = st["fs"].cat_file(path, start=req.start, end=req.stop)
                if len(data) != nbytes:
                    size = st["fs"].info(path).get("size")
                    if isinstance(size, int) and size < req.stop:  # the object ends early: retrying cannot help
                        raise UnreadableSample(f"{what}: the shard object is {size} bytes, the index needs "
                                               f"{req.stop} (truncated shard?)")
                    raise ConnectionError(f"short read: {len(data)} of {nbytes} bytes")
                return data
            try:
                data = with_retries(op, what, self.config.retry, counters)
            except UnreadableSample:
                raise
            except FileNotFoundError as e:
                raise UnreadableSample(f"{what}: shard not found ({e})") from e
            except Exception as e:  # noqa: BLE001 - permanent, or retried to the deadline: name the range
                raise UnreadableSample(str(e) if str(e).startswith(what) else f"{what}: {e}") from e
        if len(data) != nbytes:
            raise UnreadableSample(f"{what}: short read ({len(data)} of {nbytes} bytes; truncated shard?)")
        counters.requests += 1
        counters.bytes += nbytes
        mv = memoryview(data)
        heads = [(p.slot, p.name, mv[p.off - req.start + p.skip:p.off - req.start + p.nbytes]) for p in req.parts
                 if p.kind == _HEADER]
        return _Fetched(data, _header_errors(heads, {m.name: m for m in self.modalities}))

    def _pread(self, path: str, offset: int, nbytes: int, st: dict[str, Any]) -> bytearray:
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        with st["fds"].open(path) as fd:
            while got < nbytes:
                k = os.preadv(fd, [view[got:]], offset + got)
                if k == 0:
                    break
                got += k
        return buf if got == nbytes else buf[:got]


class _Entries:
    """A reader's samples as node-cache entries: the bytes of a sample's requests, end to end."""

    def __init__(self, dataset: ShardDataset):
        self.ds = dataset

    def __len__(self) -> int:
        return len(self.ds.index.key)

    def _task(self, row: int) -> list[_Request]:
        return self.ds._plan_requests(np.array([row]), np.array([0]))

    def entry_size(self, row: int) -> int:
        return sum(req.stop - req.start for req in self._task(row))

    def fetch_entry(self, row: int, counters: IOCounters) -> bytes | None:
        """The entry from storage, None unless it matches the index (the direct read then reads and reports)."""
        st, task = self.ds._state(), self._task(row)
        got = [self.ds._fetch(req, st, counters) for req in task]
        if any(g.bad for g in got) or self.ds._mismatched(task, got):
            return None
        return b"".join(g.view() for g in got)

    def entry_matches(self, row: int, data: bytes) -> bool:
        task = self._task(row)
        got = self.ds._split(task, data)
        return not any(g.bad for g in got) and not self.ds._mismatched(task, got)


def read_in_part(modalities: Sequence[Modality], bands: Mapping[str, Sequence[int]] | None,
                 compressed: bool) -> list[str]:
    """The modalities of which only some bands are fetched (uncompressed members with a selection short of all their
    bands): those whose reads are verified through the chunk digests."""
    if compressed:
        return []
    selected = _band_selection(modalities, bands)
    return [m.name for m in modalities if len(selected[m.name]) < len(m.bands)]


def _band_selection(modalities: Sequence[Modality],
                    bands: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """Per modality the storage indices to read, sorted (all bands where ``bands`` names none)."""
    bands = dict(bands or {})
    names = [m.name for m in modalities]
    unknown = sorted(set(bands) - set(names))
    if unknown:
        raise ValueError(f"band selection for modalities {unknown} that are not read (reading {names})")
    out = {}
    for m in modalities:
        sel = bands.get(m.name)
        if sel is None:
            out[m.name] = tuple(range(len(m.bands)))
            continue
        idx = sorted({int(i) for i in sel})
        if not idx or idx[0] < 0 or idx[-1] >= len(m.bands):
            raise ValueError(f"band selection of {m.name!r}: {list(sel)} must be some of 0..{len(m.bands) - 1} "
                             f"(its bands: {', '.join(m.bands)})")
        out[m.name] = tuple(idx)
    return out


def _run_now(fn: Any, *args: Any) -> Future:
    """``fn(*args)`` run on this thread, as a completed future."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - handed to the caller like a pool future's
        fut.set_exception(e)
    return fut


class _FdCache:
    """Open shard files, shared by the reading threads. Beyond ``keep`` open files the idle ones are closed; a file
    being read is never closed under its reader."""

    def __init__(self, keep: int = 256):
        self.keep = keep
        self._fds: dict[str, int] = {}
        self._users: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fds)

    @contextmanager
    def open(self, path: str) -> Iterator[int]:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                if len(self._fds) >= self.keep:
                    for p in [p for p, n in self._users.items() if n == 0]:
                        os.close(self._fds.pop(p))
                        del self._users[p]
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise UnreadableSample(f"{path}: cannot open shard: {e}") from e
                self._fds[path] = fd
                self._users[path] = 0
            self._users[path] += 1
        try:
            yield fd
        finally:
            with self._lock:
                self._users[path] -= 1


class _BufferPool:
    """Batch arrays for reading in this process, handed out again once nothing but the pool refers to them.

    A batch tensor made with ``torch.from_numpy`` keeps its array alive, and so does every view or slice of it: an
    array whose only references are the pool's is no longer reachable by the consumer and can be overwritten. Reusing
    it spares the page faults of fresh memory, which cost about as much as reading page-cached bytes into it.

    ``pinned`` (with CUDA only) allocates the arrays in pinned memory (``torch.empty(..., pin_memory=True)``, used
    through ``.numpy()``), so a host→device copy can read them asynchronously as they are. Such a copy still reads
    the array after the consumer has dropped it: ``fence(ptr, event)`` keeps the array (pooled or not) referenced
    until ``event.query()`` is true, so it is neither handed out again nor freed before the copy has completed.
    """

    def __init__(self, keep: int, pinned: bool = False):
        self.keep = keep
        self.pinned = bool(pinned) and torch.cuda.is_available()
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._fenced: list[tuple[np.ndarray, Any]] = []  # (array, event) until the event has completed
        self._out: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()  # data ptr → array
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self._lock:
            if self._fenced:
                self._fenced = [f for f in self._fenced if not f[1].query()]
            arrays = self._free.setdefault((tuple(shape), np.dtype(dtype).str), [])
            if _UNREFERENCED is not None:
                for a in arrays:
                    if sys.getrefcount(a) == _UNREFERENCED:
                        return a
            a = self._new(shape, dtype)
            if len(arrays) < self.keep and _UNREFERENCED is not None:
                arrays.append(a)
            if a.size:
                self._out[a.__array_interface__["data"][0]] = a
            return a

    def _new(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if not self.pinned:
            return np.empty(shape, dtype)
        proto = torch.from_numpy(np.empty(0, dtype=dtype))
        return torch.empty(shape, dtype=proto.dtype, pin_memory=True).numpy()  # the array keeps the tensor alive

    def nbytes(self, shape: tuple[int, ...], dtype: np.dtype) -> int:
        """Bytes an array of ``shape``/``dtype`` takes from this pool's allocator."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return 1 << (n - 1).bit_length() if self.pinned and n > 1 else n

    def fence(self, ptr: int, event: Any) -> bool:
        """Hold the array at data pointer ``ptr`` until ``event.query()``; False when no array of this pool is
        there."""
        with self._lock:
            a = self._out.get(ptr)
            if a is None:
                return False
            self._fenced.append((a, event))
            return True

    def live(self) -> int:
        """Arrays of this pool alive now (pooled or not), for tests and diagnostics."""
        with self._lock:
            return len(self._out)


def _unreferenced_count() -> int | None:
    """``sys.getrefcount`` of an array held only by a pool list, measured the way ``_BufferPool.get`` sees it
    (``None`` — no reuse — where reference counts are not exact: free-threaded builds)."""
    if getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        return None
    arrays = [np.empty(1)]
    for a in arrays:
        return sys.getrefcount(a)
    return None


_UNREFERENCED = _unreferenced_count()


def _batch_tensor(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised batch tensor; in a DataLoader worker it lives in shared memory from the start, so handing
    it to the main process copies nothing (the same trick as torch's ``default_collate``)."""
    proto = torch.from_numpy(np.empty(0, dtype=dtype))
    if not shared:
        return torch.empty(shape, dtype=proto.dtype)
    numel = int(np.prod(shape))
    storage = proto._typed_storage()._new_shared(numel, device="cpu")
    return proto.new(storage).resize_(*shape)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy())


def _pinned_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).pin_memory()


_IO_FIELDS = tuple(f.name for f in fields(IOCounters))


def io_tensor(counters: IOCounters, seconds: float) -> torch.Tensor:
    """A batch's I/O counters and read time as a small tensor (it crosses from the worker with the batch)."""
    return torch.tensor([*(getattr(counters, f) for f in _IO_FIELDS), int(seconds * 1e6)], dtype=torch.int64)


def io_from_tensor(t: torch.Tensor) -> tuple[IOCounters, float]:
    """Inverse of :func:`io_tensor`."""
    *values, micros = (int(x) for x in t.tolist())
    return IOCounters(**dict(zip(_IO_FIELDS, values))), micros / 1e6


def passthrough(batch: Any) -> Any:
    """``collate_fn`` for :class:`ShardDataset`, whose ``__getitems__`` already collates."""
    return batch
