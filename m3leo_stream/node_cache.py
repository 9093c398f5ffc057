"""A node-local cache of the byte ranges the training plan reads, shared by the node's ranks.

The epoch order is a pure function of seed, epoch and ranks (:mod:`m3leo_stream.planner`), so a node knows which
samples its ranks read next and when. An entry is one sample's bytes exactly as the reader requests them (the members
it reads, or their headers and selected bands; see :class:`~m3leo_stream.reader.ShardDataset`), one file per sample
under ``<cache_dir>/node-cache/<fingerprint>/``:

- **No double downloads.** A rank fetches an entry while holding ``flock`` on its ``.part`` file and publishes it by
  renaming that file; a rank wanting the same entry meanwhile waits on the lock and then reads the published file.
  A process killed while fetching leaves a ``.part`` nobody holds: the next rank takes it over.
- **Eviction by next use.** When the byte budget is reached the entry whose next use in the node's plan is farthest
  goes first (the optimal policy when the future is known); an entry needed later than everything held is not kept.
  The node's plan (:class:`NodePlan`) is sorted arrays of the reads of two epochs, searched for many entries at once.
- **Ahead of need.** A bounded prefetcher fetches this rank's next samples in plan order, admitted as the optimum
  would admit them when they are read (see ``NodeCache._victims``), their bytes held from admission to publication.
- **Counted without listing.** The entries held and their sizes are in a ledger shared by the node's processes
  (``.sizes``, see ``_Ledger``), so admitting an entry does not list a directory of a million files.
- **Checked on every read.** An entry is served only when its size and the index's XXH3 digests match; otherwise it
  is removed and fetched again. So entries left by an earlier run (a requeue) are reused once they check.
- **Degrades.** When the directory cannot be created or written (a full or read-only disk) the cache turns itself off
  and the reader reads from storage directly.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from .planner import PAD_FLAG, EpochPlan
from .storage import IOCounters

log = logging.getLogger(__name__)

EPOCH_STRIDE = 1 << 32  # a plan position is epoch * EPOCH_STRIDE + global batch number
NEVER = float("inf")
EVICT_SLACK = 1 / 64  # of the budget: made free at once when eviction is due and ...
MANY_ENTRIES = 4096  # ... at least this many entries are held
LEDGER_BLOCK = 256  # rows per held-count in the ledger
_ENTRY = re.compile(r"^[0-9]+$")


class EntrySource(Protocol):
    """What the cache needs from the reader: how many rows there are, an entry's size, its bytes from storage, and
    whether bytes are it."""

    def __len__(self) -> int: ...

    def entry_size(self, row: int) -> int: ...

    def fetch_entry(self, row: int, counters: IOCounters) -> bytes | None: ...

    def entry_matches(self, row: int, data: bytes) -> bool: ...


def node_ranks(rank: int, world_size: int, env: Mapping[str, str] | None = None) -> list[int]:
    """The global ranks on this rank's node, assuming consecutive ranks per node (torchrun, Slurm's block
    distribution): ``LOCAL_WORLD_SIZE``, else ``SLURM_NTASKS_PER_NODE`` (``8`` or ``8(x4)``), else this rank alone."""
    env = os.environ if env is None else env
    raw = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
    m = re.match(r"\d+", raw)
    local = max(1, min(int(m.group()) if m else 1, world_size))
    first = rank - rank % local
    return list(range(first, min(first + local, world_size)))


@dataclass
class _EpochUses:
    """One epoch's reads by the node's ranks, as arrays. ``keys`` are ``row * span + batch`` ascending, one per read
    (so a row's uses lie together, in batch order, and one ``searchsorted`` finds the first at or after a batch);
    ``consumed`` marks those this rank has read; ``mine_*`` are this rank's reads in plan order."""

    epoch: int
    span: int  # batches in the epoch (at least 1)
    keys: np.ndarray  # int64
    consumed: np.ndarray  # bool, one per key
    top: int  # the largest row read (rows above it have no uses)
    mine_rows: np.ndarray  # int32 where rows fit, else int64
    mine_batches: np.ndarray  # int32 (int64 past 2**31 batches), ascending

    @classmethod
    def learn(cls, plan: EpochPlan, epoch: int, rank: int, world_size: int, ranks: Sequence[int],
              keys: np.ndarray) -> _EpochUses:
        """This rank's part of the epoch beside ``keys``, the node's (``node_keys``)."""
        span = max(1, plan.num_batches)
        top = int(keys[-1]) // span if len(keys) else -1
        if rank in ranks:
            mine = plan.ranks_refs([rank], world_size)[:, 0]  # (batches, per rank)
            mine_rows = mine.reshape(-1)
            mine_batches = np.repeat(np.arange(mine.shape[0], dtype=np.int64), mine.shape[1])
            if len(mine_rows) and int(mine_rows.max()) >= PAD_FLAG:
                real = (mine_rows & PAD_FLAG) == 0
                mine_rows, mine_batches = mine_rows[real], mine_batches[real]
        else:
            mine_rows = mine_batches = np.zeros(0, np.int64)
        return cls(epoch, span, keys, np.zeros(len(keys), np.bool_), top,
                   mine_rows.astype(_narrow(top)), mine_batches.astype(_narrow(span)))

    def open_use(self, rows: np.ndarray, first: int) -> np.ndarray:
        """Per row (ascending rows search fastest), the index into ``keys`` of its first use not consumed at batch
        ``>= first``, else -1."""
        lo = np.minimum(rows, self.top + 1) * self.span
        return self._skip_consumed(np.searchsorted(self.keys, lo + min(max(first, 0), self.span)), lo + self.span)

    def open_at(self, rows: np.ndarray, batches: np.ndarray) -> np.ndarray:
        """Whether each (row, batch) has a use not consumed at exactly that batch."""
        keys = rows.astype(np.int64) * self.span + batches
        return self._skip_consumed(np.searchsorted(self.keys, keys), keys + 1) >= 0

    def _skip_consumed(self, i: np.ndarray, below: np.ndarray) -> np.ndarray:
        """From ``i``, step past consumed uses while keys stay under ``below``; -1 where no use is left there."""
        n = len(self.keys)
        if not n:
            return np.full(len(i), -1, np.int64)
        while True:
            j = np.minimum(i, n - 1)
            inside = (i < n) & (self.keys[j] < below)
            blocked = inside & self.consumed[j]
            if not blocked.any():
                return np.where(inside, i, -1)
            i = i + blocked

    def open_one(self, row: int, first: int) -> int:
        """``open_use`` of one row, in Python ints (a tenth of the array call's cost)."""
        if not 0 <= row <= self.top:
            return -1
        lo = row * self.span
        i, n = int(self.keys.searchsorted(lo + min(max(first, 0), self.span))), len(self.keys)
        while i < n and int(self.keys[i]) < lo + self.span:
            if not self.consumed[i]:
                return i
            i += 1
        return -1

    def position(self, i: int) -> int:
        """The plan position of use ``i``."""
        return self.epoch * EPOCH_STRIDE + int(self.keys[i]) % self.span

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.consumed, self.mine_rows, self.mine_batches))


def node_keys(plan: EpochPlan, ranks: Sequence[int], world_size: int) -> np.ndarray:
    """The reads of ``ranks`` in ``plan`` as ascending int64 keys ``row * num_batches + batch`` (padding left out):
    what NodePlan searches, the same for every rank of a node."""
    refs = plan.ranks_refs(ranks, world_size)  # (batches, ranks, per rank)
    span = max(1, refs.shape[0])
    batch = np.arange(refs.shape[0], dtype=np.int64)
    if refs.size and int(refs.max()) >= PAD_FLAG:  # evaluation plans: leave the padding out
        real = (refs & PAD_FLAG) == 0
        rows = refs[real]
        _check_keys(rows, span)
        keys = rows * span + np.broadcast_to(batch[:, None, None], refs.shape)[real]
    else:  # one array made, in place: the temporaries of a vectorised expression would stay in malloc's heap
        _check_keys(refs, span)
        keys = np.array(refs, dtype=np.int64).reshape(refs.shape[0], refs.shape[1] * refs.shape[2])
        keys *= span
        keys += batch[:, None]
        keys = keys.reshape(-1)
    keys.sort()
    return keys


def _check_keys(rows: np.ndarray, span: int) -> None:
    top = int(rows.max()) if rows.size else -1
    if (top + 2) * span >= 1 << 63:
        raise ValueError(f"rows up to {top} in {span} batches do not fit 64-bit use keys")


def _narrow(top: int) -> type[np.signedinteger]:
    return np.int32 if top < 1 << 31 else np.int64


class NodePlan:
    """When this node's ranks read each sample: positions (epoch-major global batch numbers) per index row, learned
    an epoch at a time from ``plan_for`` (the pure planning function) into sorted arrays: 8 bytes a read by the
    node's ranks (``node_keys``; with ``share``, held once per node), 1 a read for this rank's consumed marks and 8
    a read by this rank. At 17M samples, 8 ranks a node, two epochs known: 9 MB a rank plus 34 MB a node, learned
    in 0.2 s an epoch (``bench/node_plan.py``). ``position`` says where this rank's consumer is, as
    ``(epoch, batch)`` or None before the first batch. Thread-safe."""

    def __init__(self, plan_for: Callable[[int], EpochPlan], position: Callable[[], tuple[int, int] | None],
                 rank: int, world_size: int, ranks: Sequence[int], first_epoch: int = 0,
                 last_epoch: int | None = None,
                 share: Callable[[int, Callable[[], np.ndarray]], np.ndarray] | None = None):
        """``last_epoch``: the last epoch the run trains (None: unbounded); nothing after it is prefetched.
        ``share(epoch, build)``: the node's keys of ``epoch`` (``node_keys``), built by ``build`` once per node and
        mapped by its ranks (the DataModule's ``node_arrays``); without it each rank builds its own."""
        self._plan_for, self._position, self._share = plan_for, position, share
        self.last_epoch = last_epoch
        # batches past the consumer's position that the loader reads itself (its read-ahead): ``ahead`` starts after
        # them, so that the prefetcher fetches other samples than the loader's threads rather than the same ones
        self.lead = 0
        self.rank, self.world_size, self.ranks = rank, world_size, list(ranks)
        self._first_epoch = first_epoch
        self._epochs: list[_EpochUses] = []  # the epochs known and not forgotten, ascending
        self._known = -1  # last epoch learned
        self._lock = threading.Lock()  # guards _epochs and the consumed marks
        self._learning = threading.Lock()  # one thread learns an epoch, the others look up meanwhile

    def now(self) -> int:
        pos = self._position()
        return self._first_epoch * EPOCH_STRIDE if pos is None else pos[0] * EPOCH_STRIDE + pos[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held."""
        with self._lock:
            return sum(e.nbytes for e in self._epochs)

    def _learn(self, upto: int) -> None:
        """Know the epochs up to ``upto``; forget those before the epoch of ``now``."""
        now_epoch = self.now() // EPOCH_STRIDE
        epochs = self._epochs
        if self._known >= upto and (not epochs or epochs[0].epoch >= now_epoch):
            return  # nothing to learn or forget (read unlocked: at worst the locked path runs and finds the same)
        with self._learning:
            if self._known < 0:
                self._known = max(self._first_epoch, now_epoch) - 1
            while self._known < upto:
                epoch = self._known + 1
                plan = self._plan_for(epoch)

                def build(plan: EpochPlan = plan) -> np.ndarray:
                    return node_keys(plan, self.ranks, self.world_size)
                keys = build() if self._share is None else self._share(epoch, build)
                uses = _EpochUses.learn(plan, epoch, self.rank, self.world_size, self.ranks, keys)
                with self._lock:
                    self._epochs.append(uses)
                self._known = epoch
            if self._epochs and self._epochs[0].epoch < now_epoch:
                with self._lock:
                    self._epochs = [e for e in self._epochs if e.epoch >= now_epoch]

    def _first_open(self, rows: np.ndarray, after: int) -> list[tuple[_EpochUses, np.ndarray, np.ndarray]]:
        """Per known epoch from that of ``after``: the rows (positions in ``rows``) whose first use not consumed at
        or after ``after`` lies in that epoch, and those uses' indices into its keys. Under the lock."""
        out = []
        todo = np.arange(len(rows))
        for e in self._epochs:
            base = e.epoch * EPOCH_STRIDE
            if base + EPOCH_STRIDE <= after or not len(todo):
                continue
            i = e.open_use(rows[todo], after - base)
            hit = i >= 0
            out.append((e, todo[hit], i[hit]))
            todo = todo[~hit]
        return out

    def _open_one(self, row: int, after: int) -> tuple[_EpochUses, int] | None:
        """The epoch and key index of ``row``'s first use not consumed at or after ``after``. Under the lock."""
        for e in self._epochs:
            base = e.epoch * EPOCH_STRIDE
            if base + EPOCH_STRIDE > after and (i := e.open_one(row, after - base)) >= 0:
                return e, i
        return None

    def next_uses(self, rows: np.ndarray | Sequence[int], after: int) -> np.ndarray:
        """``next_use`` of each of ``rows``, as float64 (positions are below 2**53; ``NEVER`` is inf)."""
        self._learn(after // EPOCH_STRIDE + 1)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)
        out = np.full(len(rows), NEVER)
        with self._lock:
            for e, which, i in self._first_open(rows[order], after):
                out[order[which]] = e.epoch * EPOCH_STRIDE + e.keys[i] % e.span
        return out

    def next_use(self, row: int, after: int) -> float:
        """The first position ``>= after`` at which a node rank reads ``row`` (``NEVER`` if none is planned in the
        epochs known; the next epoch is learned when ``after`` reaches the current one)."""
        self._learn(after // EPOCH_STRIDE + 1)
        with self._lock:
            found = self._open_one(int(row), after)
        return NEVER if found is None else found[0].position(found[1])

    def consume(self, row: int) -> None:
        """This rank is reading ``row`` for its next planned use: that use is no longer ahead (the reader runs
        ahead of the consumer whose position ``now`` is)."""
        after = self.now()
        self._learn(after // EPOCH_STRIDE + 1)
        with self._lock:
            found = self._open_one(int(row), after)
            if found is not None:
                found[0].consumed[found[1]] = True

    def ahead(self, n: int) -> list[int]:
        """The rows this rank reads at its next ``n`` planned uses not yet read, in plan order, from ``lead``
        batches past the consumer's position on (into the next epoch where the lead reaches past this one)."""
        now = self.now()
        self._learn(now // EPOCH_STRIDE + 1)
        end = NEVER if self.last_epoch is None else (self.last_epoch + 1) * EPOCH_STRIDE
        out: list[int] = []
        skip = max(0, int(self.lead))
        with self._lock:
            for e in self._epochs:
                base = e.epoch * EPOCH_STRIDE
                if base >= end or len(out) >= n:
                    break
                if base + EPOCH_STRIDE <= now:
                    continue
                first = max(0, now - base) + skip
                if first >= e.span:  # the loader reads on past this epoch's last batch
                    skip = first - e.span
                    continue
                skip = 0
                j = int(np.searchsorted(e.mine_batches, first))
                while j < len(e.mine_rows) and len(out) < n:
                    stop = min(len(e.mine_rows), j + 2 * (n - len(out)) + 8)
                    rows, batches = e.mine_rows[j:stop], e.mine_batches[j:stop]
                    out.extend(rows[e.open_at(rows, batches)][:n - len(out)].tolist())
                    j = stop
        return out


class _Ledger:
    """Which entries a node's cache holds and their sizes, shared by the node's processes without listing the
    directory: ``.sizes``, a memory-mapped int64 array with a slot per index row (0: not held), a slot holding their
    sum and, per block of :data:`LEDGER_BLOCK` rows, how many of them are held (so that finding the held rows reads
    the blocks that have some, not a slot per row of a 17M-row index), changed only under the budget lock. A slot is
    set before its entry is renamed into place (or when its fetch is admitted) and cleared after its file is
    removed, so a process killed in between leaves bytes counted that are not on disk (room given up until that row
    is fetched or evicted), never bytes on disk that are not counted. Rebuilt from a listing of the directory when
    it is new or from before the machine's last boot. Sparse: only the pages of rows held take room on disk."""

    def __init__(self, directory: Path, rows: int):
        self.dir = directory
        self.path = directory / ".sizes"
        self.rows = int(rows)
        self.blocks = -(-self.rows // LEDGER_BLOCK)
        self._ino: int | None = None
        self.follow(check_boot=True)

    def follow(self, check_boot: bool = False) -> None:
        """Map the ledger (under the budget lock): rebuilt first when it is missing, of another length or (with
        ``check_boot``) from before the machine's last boot; mapped again when another process rebuilt it."""
        slots = self.rows + 1 + self.blocks
        stamp = self.path.with_name(".sizes.boot")
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or st.st_size != slots * 8 or (check_boot and _read_text(stamp) != _boot_id()):
            tmp = self.path.with_name(f".sizes.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.truncate(slots * 8)
            arr = np.memmap(tmp, np.int64, mode="r+", shape=(slots,))
            for row, size in _listing(self.dir).items():
                if row < self.rows:
                    arr[row] = size
            sizes = arr[:self.rows]
            arr[self.rows] = int(sizes.sum())
            held = np.flatnonzero(sizes)
            arr[self.rows + 1:] = np.bincount(held // LEDGER_BLOCK, minlength=self.blocks)
            arr.flush()
            del arr, sizes
            os.replace(tmp, self.path)
            stamp.write_text(_boot_id())
            st = os.stat(self.path)
        if st.st_ino != self._ino:
            arr = np.memmap(self.path, np.int64, mode="r+", shape=(slots,))
            self._sizes, self._counts = arr[:self.rows + 1], arr[self.rows + 1:]
            self._ino = st.st_ino

    @property
    def total(self) -> int:
        return int(self._sizes[self.rows])

    def size(self, row: int) -> int:
        return int(self._sizes[row])

    def set(self, row: int, size: int) -> None:
        old = int(self._sizes[row])
        self._sizes[row] = size
        self._sizes[self.rows] += size - old
        if (old > 0) != (size > 0):
            self._counts[row // LEDGER_BLOCK] += 1 if size > 0 else -1

    def held(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows held (or being fetched) and their sizes, ascending."""
        blocks = np.flatnonzero(self._counts)
        if not len(blocks):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows = (blocks[:, None] * LEDGER_BLOCK + np.arange(LEDGER_BLOCK)).reshape(-1)
        rows = rows[rows < self.rows]
        sizes = np.asarray(self._sizes[rows])
        held = sizes != 0
        return rows[held], sizes[held]


def _listing(directory: Path) -> dict[int, int]:
    """Entries in ``directory`` and their sizes on disk."""
    out = {}
    with os.scandir(directory) as it:
        for e in it:
            if _ENTRY.match(e.name):
                try:
                    out[int(e.name)] = e.stat().st_size
                except FileNotFoundError:
                    pass
    return out


def _boot_id() -> str:
    return _read_text(Path("/proc/sys/kernel/random/boot_id")).strip() or "unknown"


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@dataclass
class CacheStats:
    """What a cache did in this process."""

    hits: int = 0  # entries served from disk after their check
    hit_bytes: int = 0
    fetched: int = 0  # entries fetched from storage (on demand or ahead)
    fetched_bytes: int = 0
    prefetched: int = 0  # of those, fetched ahead of need
    waited: int = 0  # times a rank found another fetching the same entry and waited for it
    rejected: int = 0  # entries on disk whose size or digest did not match: removed and fetched again
    evicted: int = 0
    bypassed: int = 0  # fetched but not kept: needed later than everything held
    direct: int = 0  # read past the cache (turned off: unwritable or full disk)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class NodeCache:
    """Entries of ``source`` in ``directory`` within ``budget`` bytes, evicted by next use in ``plan`` (without a
    plan: kept while they fit). ``prefetch`` of this rank's next samples are fetched ahead on ``threads`` threads."""

    def __init__(self, directory: str | Path, budget: int, source: EntrySource, plan: NodePlan | None = None,
                 prefetch: int = 32, threads: int = 4):
        self.dir = Path(directory)
        self.budget = int(budget)
        self.source = source
        self.plan = plan
        self.prefetch = int(prefetch)
        self.stats = CacheStats()
        self.io = IOCounters()  # storage I/O of the prefetcher (a batch's own reads count in its counters)
        self.enabled = True
        self._lock = threading.Lock()
        self._pending: set[int] = set()
        self._wanted: list[tuple[int, int]] = []  # (row, size) submitted for prefetch, not yet started; plan order
        self._wanted_bytes = 0
        self._reserved: set[int] = set()  # rows this process fetches ahead, admitted (counted in the ledger) already
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="m3leo-cache") if plan else None
        self._ledger: _Ledger | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / ".budget").touch()
            self._clear_abandoned()
            with self._budget():
                self._ledger = _Ledger(self.dir, len(source))
        except OSError as e:
            self._disable(e)

    # -- serving ---------------------------------------------------------------------------------------------
    def get(self, row: int, counters: IOCounters) -> bytes | None:
        """The entry of ``row``, from disk or fetched now (and kept when the plan says so); None when storage gave
        no bytes that check (the caller reads directly and reports why)."""
        if self.plan is not None:
            self.plan.consume(row)
        try:
            if not self.enabled:
                self.stats.direct += 1
                return self.source.fetch_entry(row, counters)
            data = self._read(row)
            if data is not None:
                counters.cache_hits += 1
                counters.cache_bytes += len(data)
                return data
            return self._fill(row, counters, demand=True)
        finally:
            self._top_up()

    def _path(self, row: int) -> Path:
        return self.dir / str(row)

    def _read(self, row: int) -> bytes | None:
        path = self._path(row)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: unreadable cache entry (%s); reading from storage", path, e)
            return None
        if len(data) == self.source.entry_size(row) and self.source.entry_matches(row, data):
            with self._lock:
                self.stats.hits += 1
                self.stats.hit_bytes += len(data)
            return data
        log.warning("%s: cache entry of %d bytes does not match the index (size %d or digest); fetching it again",
                    path, len(data), self.source.entry_size(row))
        with self._lock:
            self.stats.rejected += 1
        self._forget([row])
        return None

    def _fill(self, row: int, counters: IOCounters, demand: bool) -> bytes | None:
        """Fetch ``row`` under the lock of its ``.part`` file and publish it (unless another rank did meanwhile)."""
        part = self.dir / f"{row}.part"
        while True:
            if not demand:
                if self._path(row).exists():
                    return None
            else:
                data = self._read(row)
                if data is not None:
                    counters.cache_hits += 1
                    counters.cache_bytes += len(data)
                    return data
            try:
                fd = os.open(part, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as e:
                self._disable(e)
                return self.source.fetch_entry(row, counters) if demand else None
            try:
                if not demand:  # being fetched by another thread or rank: this prefetch thread moves on
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return None
                if not _lock_part(fd, part, self.stats, self._lock):
                    continue  # published (or replaced) while this rank waited: look again
                at, keep_for = self._next_use(row, demand)  # decided now: a demand read may consume the use meanwhile
                if not demand and not self._reserve(row, self.source.entry_size(row), keep_for, at):
                    _unlink(part)
                    return None
                try:
                    data = self.source.fetch_entry(row, counters)
                except BaseException:
                    self._release(row)
                    raise
                if data is None:
                    self._release(row)
                    _unlink(part)
                    return None
                with self._lock:
                    self.stats.fetched += 1
                    self.stats.fetched_bytes += len(data)
                    self.stats.prefetched += not demand
                self._publish(row, fd, part, data, keep_for)
                return data
            finally:
                os.close(fd)  # releases the lock

    def _publish(self, row: int, fd: int, part: Path, data: bytes, keep_for: float) -> None:
        try:
            os.ftruncate(fd, 0)
            view, done = memoryview(data), 0
            while done < len(data):
                done += os.pwrite(fd, view[done:], done)
            with self._budget():
                ledger = self._ledger
                assert ledger is not None
                admitted = row in self._reserved and ledger.size(row) == len(data)  # not evicted meanwhile
                with self._lock:
                    self._reserved.discard(row)
                if admitted or self._make_room(row, len(data), keep_for):
                    ledger.set(row, len(data))  # counted before it is in place: see _Ledger
                    os.rename(part, self._path(row))
                    return
                ledger.set(row, 0)
            with self._lock:
                self.stats.bypassed += 1
            _unlink(part)
        except OSError as e:
            self._release(row)
            _unlink(part)
            self._disable(e)

    # -- budget and eviction ------------------------------------------------------------------------------------
    @contextmanager
    def _budget(self) -> Iterator[None]:
        """The node-wide lock under which entries are counted, evicted and published."""
        with open(self.dir / ".budget", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if self._ledger is not None:
                self._ledger.follow()
            yield

    def _next_use(self, row: int, demand: bool) -> tuple[int, float]:
        """When an entry is read and what it is then kept for. On demand: now, and its next use (the one being
        served is consumed already). Fetched ahead: its upcoming use, and the use after that; its victims are then
        ranked from that upcoming use (see ``_victims``)."""
        if self.plan is None:
            return 0, NEVER
        now = self.plan.now()
        nxt = self.plan.next_use(row, now)
        if demand or nxt == NEVER:
            return now, nxt
        return int(nxt), self.plan.next_use(row, int(nxt) + 1)

    def _victims(self, row: int, size: int, use: float, at: int | None = None) -> list[int] | None:
        """Entries to evict so that ``size`` more bytes fit, for ``row`` read at position ``at`` (default: now)
        and needed next at ``use``; None when they cannot be made to fit. Under the budget lock.

        They are those the optimum (Belady with bypass) evicts at ``at``: farthest next use after ``at`` first,
        only those needed after ``use``. An entry fetched ahead displaces nothing before its time: when one of
        those victims is still to be read before ``at``, nothing is evicted yet (None; the fetch is tried again as
        the clock moves, or made on demand). Where the cache holds many entries, room for :data:`EVICT_SLACK` of
        the budget more is made at once, so that the held entries are ranked once per many admissions."""
        ledger = self._ledger
        assert ledger is not None
        free = self.budget - ledger.total + ledger.size(row)
        if size > self.budget:
            return None
        if free >= size:
            return []
        if self.plan is None or use == NEVER:
            return None  # nothing held is needed later than never
        rows, sizes = ledger.held()
        keep = rows != row
        rows, sizes = rows[keep], sizes[keep]
        want = size + (int(self.budget * EVICT_SLACK) if len(rows) >= MANY_ENTRIES else 0)
        now = self.plan.now()
        at = now if at is None else max(at, now)
        nxt = self.plan.next_uses(rows, at)
        ranked = np.lexsort((rows, nxt))[::-1]  # farthest next use first (ties: the larger row)
        ranked = ranked[nxt[ranked] > use]  # those needed no later than the entry stay
        gained = free + np.cumsum(sizes[ranked])
        enough = np.flatnonzero(gained >= size)
        if not len(enough):
            return None
        out = rows[ranked[:enough[0] + 1]]
        if at > now and (self.plan.next_uses(out, now) < at).any():
            return None  # one is still to be read before the entry it would make room for
        if want > size:  # the slack: the next farthest, up to the first still to be read before ``at``
            reach = np.flatnonzero(gained >= want)
            extra = rows[ranked[len(out):reach[0] + 1 if len(reach) else len(ranked)]]
            if at > now and len(extra):
                early = np.flatnonzero(self.plan.next_uses(extra, now) < at)
                extra = extra[:early[0]] if len(early) else extra
            out = np.concatenate([out, extra])
        return out.tolist()

    def _reserve(self, row: int, size: int, use: float, at: int) -> bool:
        """Admit an entry fetched ahead (Belady with bypass, decided before the fetch): evict what it displaces and
        count its bytes until it is published; False (nothing evicted) when it is needed later than all that would
        have to go."""
        with self._budget():
            victims = self._victims(row, size, use, at)
            if victims is None:
                return False
            self._evict(victims)
            assert self._ledger is not None
            self._ledger.set(row, size)
            with self._lock:
                self._reserved.add(row)
            return True

    def _release(self, row: int) -> None:
        """Give back the bytes of an admitted fetch that will not be published."""
        with self._lock:
            if row not in self._reserved:
                return
            self._reserved.discard(row)
        try:
            with self._budget():
                if self._ledger is not None:
                    self._ledger.set(row, 0)
        except OSError:
            pass

    def _evict(self, victims: list[int]) -> None:
        """Remove entries (under the budget lock): the files first, then their bytes from the ledger."""
        for r in victims:
            _unlink(self._path(r))
        assert self._ledger is not None
        for r in victims:
            self._ledger.set(r, 0)
        with self._lock:
            self.stats.evicted += len(victims)

    def _forget(self, rows: list[int]) -> None:
        """Remove entries found wrong."""
        try:
            with self._budget():
                for r in rows:
                    _unlink(self._path(r))
                if self._ledger is not None:
                    for r in rows:
                        self._ledger.set(r, 0)
        except OSError as e:
            self._disable(e)

    def _make_room(self, row: int, size: int, use: float) -> bool:
        victims = self._victims(row, size, use)
        if victims is None:
            return False
        self._evict(victims)
        return True

    # -- prefetch --------------------------------------------------------------------------------------------
    def _top_up(self) -> None:
        """Submit fetches of this rank's next samples not on disk, at most ``prefetch`` ahead."""
        if self._pool is None or not self.enabled or self.plan is None:
            return
        try:
            rows = self.plan.ahead(self.prefetch)
        except Exception as e:  # noqa: BLE001 - planning fails loudly on the training thread; here it only stops prefetch
            log.debug("no prefetch: %r", e)
            return
        with self._lock:
            for row in rows:
                if row not in self._pending and not self._path(row).exists():
                    self._pending.add(row)
                    size = self.source.entry_size(row)
                    self._wanted.append((row, size))
                    self._wanted_bytes += size
                    self._pool.submit(self._prefetch_one)

    def _prefetch_one(self) -> None:
        """Fetch a wanted row: the farthest while the free room holds a whole prefetch window (the nearest are those
        the loader reaches first, and reading one whose fetch is under way would make it wait instead of fetching
        another sample itself), else the nearest (admissions then follow plan order, as the optimum's do)."""
        ledger = self._ledger
        with self._lock:
            if not self._wanted:
                return
            window = self._wanted_bytes * self.prefetch / max(1, len(self._wanted))
            roomy = ledger is not None and self.budget - ledger.total >= window
            row, size = self._wanted.pop() if roomy else self._wanted.pop(0)
            self._wanted_bytes -= size
        try:
            self._fill(row, self.io, demand=False)
        except Exception as e:  # noqa: BLE001 - the demand read of this sample fetches it again and reports
            log.debug("prefetch of row %d failed: %r", row, e)
        finally:
            with self._lock:
                self._pending.discard(row)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # -- housekeeping ------------------------------------------------------------------------------------------
    def _clear_abandoned(self) -> None:
        """Remove ``.part`` files of processes that died while fetching (nobody holds their lock)."""
        for part in self.dir.glob("*.part"):
            try:
                fd = os.open(part, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, part):
                    _unlink(part)
            except OSError:
                pass  # being fetched
            finally:
                os.close(fd)

    def _disable(self, e: OSError) -> None:
        if self.enabled:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.warning("node cache %s %s (%s): reading from storage directly", self.dir,
                        "is on a full disk" if full else "cannot be written", e)
        self.enabled = False


def _lock_part(fd: int, part: Path, stats: CacheStats, lock: threading.Lock) -> bool:
    """Lock ``part`` (waiting while another rank fetches that entry); False when the path no longer names the file
    locked (it was published or replaced meanwhile)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with lock:
            stats.waited += 1
        fcntl.flock(fd, fcntl.LOCK_EX)
    return _same_file(fd, part)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

