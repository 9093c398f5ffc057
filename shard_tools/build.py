"""``m3leo-shards build`` and ``finalize``: repack hub-layout chips into region/split tar shards.

The build is planned before anything is decoded: chips are grouped by (region, split), sorted by identifier and
packed into shards by their exact uncompressed size (every array has its registry shape and dtype), so the plan is
a pure function of the source listing and the arguments. Shard ``i`` of the plan belongs to task
``i % num_tasks``.

A region held in parquet files (the packed release, whose row groups mix the splits) is planned by row instead:
its chips of all splits in the order of their parquet rows (file, row group, row), cut between files into reading
groups of at least ``read_group_shards`` shards' bytes (between row groups once a group grows past
``READ_GROUP_SPAN`` times that), each split's chips of a group packed into shards in
that order (a split's last shard in a group may be short). One worker builds a group's shards one after another
with one source reader, which keeps the rows a row group holds for the group's later shards, so each row group is
read once rather than once per split. Reading group ``g`` belongs to task ``g % num_tasks`` (other regions' shards
are groups of one). The reader keeps at most about a shard of each other split (``_group_pending_limit``: 2 GB
beside 1 GB shards); beyond it, rows are dropped and read again.

Each finished shard is published atomically, then a small record (its index rows, statistics and
errors) is written under ``_build/``; that record marks the shard as done, so a rerun after a crash skips it. An
array task that has all its shards writes their partial index (``shard_tools.partials``). ``finalize`` merges the
partials (and the records no partial covers) into ``index.parquet``, ``stats.json`` and, last, ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Literal, get_args

import numpy as np
from tqdm.auto import tqdm

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import REGISTRY, Modality, Registry, load_user_modalities
from m3leo_stream.storage import get_fs, is_local, join
from shard_tools import hub
from shard_tools.downsample import MANIFEST_KEY, block_reduce, check_resolutions, entry_json, provenance, stored_entries
from shard_tools.encoding import EmptyMember, to_stored
from shard_tools.grid import Chip
from shard_tools.inflight import bounded_map
from shard_tools.publish import PARTIAL, pipe_atomic, staged
from shard_tools.rasters import ChipDataError, decode_chip_file
from shard_tools.stats import StatsSet
from shard_tools.writer import ShardWriter, predicted_member_size

OnError = Literal["fail", "skip"]
"""What a build does with a chip that cannot be decoded: stop with the chip named, or leave it out and report it."""

log = logging.getLogger(__name__)
BUILD_DIR = "_build"
PLAN = f"{BUILD_DIR}/plan.json"
JSON_ALLOWANCE = 2048  # upper bound for a sample's json member payload when planning shard sizes
ERROR_EXAMPLES = 20
WRITEBACK = 32 * 2**20  # start the disk writing a shard every this many bytes (the fsync at the end waits less)


class BuildError(RuntimeError):
    """The build stopped; nothing partial was published."""


def parse_size(text: str | int) -> int:
    """'1GB', '256MiB', '500k', or a number of bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 1}
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(float(t))


@dataclass
class BuildConfig:
    src: str
    out: str
    regions: list[str] | None = None
    modalities: list[str] | None = None
    splits: list[str] = field(default_factory=lambda: list(sf.SPLITS))
    shard_size: int = 10**9
    compress: sf.Compression = "none"
    workers: int = 1
    task_index: int = 0
    num_tasks: int = 1
    on_error: OnError = "fail"
    year: int | None = 2020
    folders: dict[str, str] = field(default_factory=dict)
    gunw_pair_rule: str = "longest"
    modalities_yaml: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    src_storage_options: dict[str, Any] | None = None
    progress: bool = True
    read_group_shards: int | None = None  # parquet regions: shards' worth of bytes per reading group (see make_plan)
    resolutions: dict[str, int] = field(default_factory=dict)
    """--resolution MOD=PX: store these modalities at PX per side, an exact block reduction of their canonical
    grid by the integer factor canonical / PX (see ``shard_tools.downsample``)."""

    def content_args(self) -> dict[str, Any]:
        """Arguments that determine the shards' contents (task and worker counts do not)."""
        args: dict[str, Any] = {
            "regions": self.regions, "modalities": self.modalities, "splits": self.splits,
            "shard_size": self.shard_size, "compress": self.compress, "on_error": self.on_error,
            "year": self.year, "folders": dict(sorted(self.folders.items())), "gunw_pair_rule": self.gunw_pair_rule,
        }
        if self.read_group_shards is not None:  # only when set: plans of earlier builds stay equal
            args["read_group_shards"] = self.read_group_shards
        if self.resolutions:  # likewise
            args["resolutions"] = dict(sorted(self.resolutions.items()))
        return args

    def check(self) -> None:
        if self.on_error not in get_args(OnError):
            raise ValueError(f"--on-error must be fail or skip, not {self.on_error!r}")
        if self.compress not in ("none", "zstd"):
            raise ValueError(f"--compress must be none or zstd, not {self.compress!r}")
        if not (0 <= self.task_index < self.num_tasks):
            raise ValueError(f"--task-index {self.task_index} is outside 0..{self.num_tasks - 1}")
        bad = [s for s in self.splits if s not in sf.SPLITS]
        if bad:
            raise ValueError(f"unknown splits {bad}; use {', '.join(sf.SPLITS)}")
        if self.shard_size <= 0:
            raise ValueError("--shard-size must be positive")
        if self.read_group_shards is not None and self.read_group_shards < 1:
            raise ValueError("--read-group-shards must be at least 1")


def registry_for(cfg: BuildConfig) -> Registry:
    return load_user_modalities(cfg.modalities_yaml) if cfg.modalities_yaml else REGISTRY


# ------------------------------------------------------------------ planning


@dataclass
class ChipJob:
    key: str
    region: str
    split: str
    chip: Chip | None
    files: dict[str, hub.FileRef]


@dataclass
class ShardJob:
    path: str
    region: str
    split: str
    number: int
    chips: list[ChipJob]
    group: int = -1  # reading group (parquet regions), -1: a group of its own


@dataclass
class Plan:
    shards: list[ShardJob]
    modalities: list[Modality]
    regions: list[str]
    folders: dict[str, dict[str, str]]
    discrepancies: hub.Discrepancies
    invalid: dict[str, str]
    groups: list[list[int]] = field(default_factory=list)
    """Indices into ``shards``, one list per reading group, in the order its shards are built."""
    downsampled: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Modalities stored below their canonical size: where they come from and the rules (``downsample.provenance``);
    their entries in ``modalities`` already have the stored shape."""

    @property
    def resolutions(self) -> dict[str, int]:
        """Stored px per side of the downsampled modalities."""
        return {n: int(d["px"]) for n, d in self.downsampled.items()}

    def summary(self, cfg: BuildConfig) -> dict[str, Any]:
        return {
            "format_version": sf.FORMAT_VERSION,
            "args": cfg.content_args(),
            "modalities": [m.name for m in self.modalities],
            "modality_entries": {m.name: entry_json(m, self.downsampled) for m in self.modalities},
            "regions": self.regions,
            "folders": self.folders,
            "shards": [{"path": s.path, "region": s.region, "split": s.split, "keys": [c.key for c in s.chips],
                        **({"group": s.group} if s.group >= 0 else {})} for s in self.shards],
            "discrepancies": self.discrepancies.to_json(),
            "invalid": dict(sorted(self.invalid.items())),
        }


def sample_size(modalities: Mapping[str, Modality], present: Sequence[str]) -> int:
    """Exact uncompressed tar bytes of a sample with these members (json bounded by an allowance)."""
    size = predicted_member_size(JSON_ALLOWANCE)
    for name in present:
        m = modalities[name]
        size += predicted_member_size(sf.npy_header_size(m.shape, m.np_dtype) + m.nbytes)
    return size


def make_plan(cfg: BuildConfig, registry: Registry | None = None) -> Plan:
    """Catalogue the source and pack chips into shards (by the sizes they are stored at)."""
    registry = registry or registry_for(cfg)
    wanted = registry.select(cfg.modalities)
    resolutions = check_resolutions(cfg.resolutions, registry, cfg.modalities)
    stored = stored_entries(wanted, resolutions)
    fs, src = get_fs(cfg.src, cfg.src_storage_options if cfg.src_storage_options is not None else cfg.storage_options)
    regions = hub.discover_regions(fs, src, cfg.regions)
    disc = hub.Discrepancies()
    invalid: dict[str, str] = {}
    shards: list[ShardJob] = []
    folders: dict[str, dict[str, str]] = {}
    used: set[str] = set()
    groups: list[list[int]] = []
    for rsrc in regions:
        cat = hub.catalog_region(fs, rsrc, registry, wanted, cfg.year, cfg.folders)
        disc.merge(cat.discrepancies)
        folders[rsrc.aoi] = cat.folders
        for ident, reason in cat.invalid.items():
            invalid[f"{rsrc.aoi}/{ident}"] = reason
        by_split: dict[str, list[ChipJob]] = {s: [] for s in cfg.splits}
        for ident in sorted(cat.splits):
            split = cat.splits[ident]
            if split not in by_split:
                continue
            files = {name: fmap[ident] for name, fmap in cat.files.items() if ident in fmap}
            if not files:
                continue
            try:
                sf.check_key(ident)
            except sf.FormatError as e:
                invalid[f"{rsrc.aoi}/{ident}"] = str(e)
                continue
            used.update(files)
            by_split[split].append(ChipJob(ident, rsrc.aoi, split, cat.chips.get(ident), files))
        mods = stored
        order = [m.name for m in wanted]
        if not any(ref.in_parquet for jobs in by_split.values() for j in jobs for ref in j.files.values()):
            for split in cfg.splits:
                for number, chips in enumerate(_pack(by_split[split], mods, cfg.shard_size)):
                    shards.append(ShardJob(sf.shard_name(rsrc.aoi, split, number), rsrc.aoi, split, number, chips))
                    groups.append([len(shards) - 1])
            continue
        # parquet: chips in the order of their rows, cut into reading groups between files (the release packs a
        # chip's modalities in files of the same parquet identifier, whatever the row order in each), or between
        # row groups once a group reaches READ_GROUP_SPAN times its size
        bound = (cfg.read_group_shards or READ_GROUP_SHARDS) * cfg.shard_size
        every = sorted((j for jobs in by_split.values() for j in jobs), key=lambda j: (_position(j, order), j.key))
        segments: list[list[ChipJob]] = [[]]
        size, last = 0, None
        for job in every:
            lead = _position(job, order)[:1]
            where = lead[0][:2] if lead else None
            if segments[-1] and last is not None and where is not None and (
                    (size >= bound and where[0] != last[0]) or (size >= READ_GROUP_SPAN * bound and where != last)):
                segments.append([])
                size = 0
            segments[-1].append(job)
            size += sample_size(mods, list(job.files))
            last = where
        region_shards: dict[str, list[ShardJob]] = {split: [] for split in cfg.splits}
        region_groups: list[list[ShardJob]] = []
        for seg in segments:
            members: list[ShardJob] = []
            for split in cfg.splits:
                for chips in _pack([j for j in seg if j.split == split], mods, cfg.shard_size):
                    number = len(region_shards[split])
                    shard = ShardJob(sf.shard_name(rsrc.aoi, split, number), rsrc.aoi, split, number, chips,
                                     group=len(groups) + len(region_groups))
                    region_shards[split].append(shard)
                    members.append(shard)
            # built in the order they end: rows of later shards kept meanwhile are those of the other splits
            members.sort(key=lambda x: (_position(x.chips[-1], order), x.split, x.number))
            region_groups.append(members)
        base = len(shards)
        for split in cfg.splits:
            shards += region_shards[split]
        index = {id(x): base + i for i, x in enumerate(shards[base:])}
        groups += [[index[id(x)] for x in members] for members in region_groups]
    modalities = [stored[m.name] for m in wanted if m.name in used]
    downsampled = {n: provenance(registry[n], px) for n, px in resolutions.items() if n in used}
    return Plan(shards, modalities, [r.aoi for r in regions], folders, disc, invalid, groups, downsampled)


READ_GROUP_SHARDS = 16
"""Default size of a parquet region's reading groups, in shards' worth of sample bytes."""
READ_GROUP_SPAN = 4
"""A reading group longer than this many times its size is cut between row groups of one file."""


def _position(job: ChipJob, order: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """Where a chip's rows lie in the parquet files: (file, row group, row) of each of its parquet modalities."""
    return tuple((r.path, r.row_group, r.row) for r in (job.files[n] for n in order if n in job.files)
                 if r.in_parquet)


def _pack(jobs: Sequence[ChipJob], mods: Mapping[str, Modality], shard_size: int) -> list[list[ChipJob]]:
    """Consecutive chips into shards of at most ``shard_size`` sample bytes (a larger chip alone)."""
    out: list[list[ChipJob]] = []
    current: list[ChipJob] = []
    size = 0
    for job in jobs:
        s = sample_size(mods, list(job.files))
        if current and size + s > shard_size:
            out.append(current)
            current, size = [], 0
        current.append(job)
        size += s
    if current:
        out.append(current)
    return out


# ------------------------------------------------------------------ one shard (runs in a worker process)


@dataclass
class ShardTask:
    shard: ShardJob
    out: str
    out_options: dict[str, Any]
    src: str
    src_options: dict[str, Any]
    modalities: list[Modality]  # the registry's entries: what the source files are decoded onto
    compress: sf.Compression
    on_error: OnError
    year: int | None
    gunw_pair_rule: str
    resolutions: dict[str, int] = field(default_factory=dict)  # modalities stored at this px (block-reduced)

    def stored(self) -> dict[str, Modality]:
        """The entries of what is written (the downsampled ones with their stored shape)."""
        return stored_entries(self.modalities, self.resolutions)


def _record_path(root: str, shard_path: str) -> str:
    return join(root, BUILD_DIR, "shards", shard_path[: -len(".tar")] + ".json")


def _source_name(ref: hub.FileRef, src_root: str) -> str:
    rel = ref.path[len(src_root):].lstrip("/") if ref.path.startswith(src_root) else ref.path
    return f"{rel}#rowgroup={ref.row_group},row={ref.row}" if ref.in_parquet else rel


def _prefetch(reader: hub.SourceReader, chips: list[ChipJob], sequential: bool, depth: int = 4):
    """Yield (chip, {modality: bytes, local path or exception}); remote files are read ahead by ``depth`` threads,
    local ones by the kernel (``POSIX_FADV_WILLNEED``, asked from a thread) ``LOCAL_READ_AHEAD`` chips ahead."""
    def read_all(job: ChipJob) -> dict[str, bytes | str | BaseException]:
        out: dict[str, bytes | str | BaseException] = {}
        for name, ref in job.files.items():
            try:
                out[name] = reader.read(ref)
            except Exception as e:  # noqa: BLE001 - reported per member by the caller
                out[name] = e
        return out

    if sequential:
        ahead = _KernelReadAhead() if is_local(reader.fs) else None
        try:
            for i, job in enumerate(chips):
                if ahead is not None:  # at the first chip this and the next LOCAL_READ_AHEAD, then one more each
                    ahead.advise(chips[0 if i == 0 else i + LOCAL_READ_AHEAD: i + LOCAL_READ_AHEAD + 1])
                yield job, read_all(job)
        finally:
            if ahead is not None:
                ahead.close()
        return
    with ThreadPoolExecutor(depth) as pool:
        yield from bounded_map(pool, read_all, chips, depth)


LOCAL_READ_AHEAD = 4  # chips of a local source whose files the kernel is asked to read ahead


class _KernelReadAhead:
    """Asks the kernel to start reading local source files into the page cache (``POSIX_FADV_WILLNEED``), in
    order, from one thread: submitting the reads can block on a busy disk, and the caller is meanwhile decoding."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="m3leo-fadvise") \
            if hasattr(os, "posix_fadvise") else None

    def advise(self, chips: Sequence[ChipJob]) -> None:
        paths = [ref.path for job in chips for ref in job.files.values() if not ref.in_parquet]
        if self._pool is not None and paths:
            self._pool.submit(_will_need, paths)

    def close(self) -> None:
        """Drop the requests not yet made (they are only hints) and let the thread end."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _will_need(paths: Sequence[str]) -> None:
    """Ask the kernel to start reading local files into the page cache (a no-op where they are cached already)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # reported when the file is read
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _group_pending_limit(tasks: Sequence[ShardTask]) -> int:
    """Rows a reading group's reader keeps for its later shards: about a shard of each other split (shards are
    built in the order they end, so those of the other splits are being gathered meanwhile), and a margin."""
    largest = max(sum(sample_size(t.stored(), list(c.files)) for c in t.shard.chips) for t in tasks)
    return hub.PENDING_LIMIT + (len(sf.SPLITS) - 1) * largest


def build_group(tasks: Sequence[ShardTask]) -> list[dict[str, Any]]:
    """Build a reading group's shards one after another with one source reader: rows of a row group read for one
    shard that later shards of the group need are kept for them, so each row group is read once per group."""
    if len(tasks) == 1:
        return [build_shard(tasks[0])]
    src_fs, _ = get_fs(tasks[0].src, tasks[0].src_options)
    refs = [ref for t in tasks for c in t.shard.chips for ref in c.files.values()]
    with hub.SourceReader(src_fs, refs, pending_limit=_group_pending_limit(tasks)) as reader:
        return [build_shard(t, reader) for t in tasks]


def build_shard(task: ShardTask, reader: hub.SourceReader | None = None) -> dict[str, Any]:
    """Build, publish and record one shard (with ``reader``, a group's shared one, left open). Raises
    :class:`BuildError` on invalid data with ``on_error=fail``."""
    shard = task.shard
    out_fs, out_root = get_fs(task.out, task.out_options)
    src_fs, src_root = get_fs(task.src, task.src_options)
    own_reader = reader is None
    if reader is None:
        reader = hub.SourceReader(src_fs, [ref for c in shard.chips for ref in c.files.values()])
    mods = {m.name: m for m in task.modalities}
    stored = task.stored()
    stats = StatsSet(stored.values()) if shard.split == "train" else None
    schema = sf.index_schema({m.name: len(m.bands) for m in task.modalities}, task.compress == "zstd")
    member_columns = schema.names[len(sf.BASE_INDEX_COLUMNS):]
    rows: dict[str, list[Any]] = {c: [] for c in schema.names}
    errors: list[str] = []
    empty: list[str] = []
    encodings: Counter = Counter()
    skipped_chips = skipped_members = empty_members = 0
    dest = join(out_root, shard.path)
    # parquet row groups are cached by the reader (not thread-safe); local files need no read-ahead
    sequential = is_local(src_fs) or any(r.in_parquet for c in shard.chips for r in c.files.values())
    try:
        with (staged(out_fs, dest) as tmp_path, open(tmp_path, "wb") as f,
              ShardWriter(f, task.compress, writeback=WRITEBACK, background=True) as writer):
            for job, contents in _prefetch(reader, shard.chips, sequential):
                arrays: dict[str, np.ndarray] = {}
                info: dict[str, Any] = {}
                bounds = job.chip.bounds if job.chip else None
                for name in mods:
                    if name not in job.files:
                        continue
                    ref = job.files[name]
                    where = _source_name(ref, src_root)
                    factor = mods[name].canonical_px // stored[name].canonical_px
                    try:
                        data = contents[name]
                        if isinstance(data, BaseException):
                            raise ChipDataError(where, job.key, f"unreadable: {data}")
                        dec = decode_chip_file(mods[name], data, where, job.key,
                                               {"year": task.year, "pair_rule": task.gunw_pair_rule})
                        member = to_stored(mods[name], dec, where, job.key)
                        array = member.array
                        if factor > 1:
                            try:
                                array = block_reduce(mods[name], array, factor)
                            except ValueError as e:
                                raise ChipDataError(where, job.key, str(e)) from e
                    except EmptyMember as e:
                        empty_members += 1
                        if len(empty) < ERROR_EXAMPLES:
                            empty.append(str(e))
                        continue
                    except ChipDataError as e:
                        if task.on_error == "fail":
                            raise BuildError(str(e)) from e
                        skipped_members += 1
                        if len(errors) < ERROR_EXAMPLES:
                            errors.append(str(e))
                        continue
                    arrays[name] = array
                    encodings[f"{name}\t{member.encoding.name}"] += 1
                    if bounds is None and dec.bounds is not None and (dec.crs or "").upper() == "EPSG:4326":
                        bounds = tuple(float(x) for x in dec.bounds)
                    info[name] = {
                        "source": where, "folder": ref.folder, "original_shape": list(dec.array.shape),
                        "source_dtype": dec.array.dtype.name, "encoding": member.encoding.name,
                        "resampling": member.resampling, "selection": dec.selection,
                    }
                    if factor > 1:
                        info[name]["downsample_factor"] = factor
                    if member.missing_bands:  # a block reduction keeps a band empty exactly when it was
                        info[name]["missing_bands"] = member.missing_bands
                if not arrays:
                    skipped_chips += 1
                    if len(errors) < ERROR_EXAMPLES:
                        errors.append(f"chip {job.key} ({job.region}/{job.split}): no readable member, left out")
                    continue
                lon = (bounds[0] + bounds[2]) / 2 if bounds else None
                lat = (bounds[1] + bounds[3]) / 2 if bounds else None
                if job.chip:
                    lon, lat = job.chip.lon, job.chip.lat
                meta = {
                    "key": job.key, "region": job.region, "split": job.split, "lon": lon, "lat": lat,
                    "bounds": list(bounds) if bounds else None, "crs": "EPSG:4326", "modalities": info,
                }
                ranges = writer.add_sample(job.key, meta, arrays)
                for col, val in (("key", job.key), ("region", job.region), ("split", job.split),
                                 ("shard", shard.path), ("lon", lon), ("lat", lat)):
                    rows[col].append(val)
                for col in member_columns:
                    rows[col].append(ranges.get(col))
                if stats is not None:
                    for name, array in arrays.items():
                        stats.add(job.region, name, array)
            nbytes, sha = writer.close()
    finally:
        if own_reader:
            reader.close()
    record = {
        "path": shard.path, "region": shard.region, "split": shard.split, "bytes": nbytes, "sha256": sha,
        "num_samples": writer.samples, "rows": rows, "stats": stats.state(shard.region) if stats else None,
        "errors": errors, "skipped_chips": skipped_chips, "skipped_members": skipped_members,
        "empty_members": empty_members, "empty_examples": empty, "encodings": dict(sorted(encodings.items())),
        "resolutions": dict(sorted(task.resolutions.items())),
    }
    pipe_atomic(out_fs, _record_path(out_root, shard.path), json.dumps(record, allow_nan=False).encode())
    return {k: record[k] for k in ("path", "bytes", "num_samples", "skipped_chips", "skipped_members",
                                   "empty_members", "errors")}


# ------------------------------------------------------------------ driver


def _clean_partials(fs, root: str, shards: Sequence[ShardJob]) -> None:
    """Remove temporary files a killed build left beside ``shards`` (local roots only). Only these shards' own
    leftovers: other array tasks build the other shards of the same directories at the same time."""
    if not is_local(fs):
        return
    mine: dict[str, set[str]] = {}
    for s in shards:
        for path in (join(root, s.path), _record_path(root, s.path)):
            mine.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    for d, names in sorted(mine.items()):
        if os.path.isdir(d):
            for name in os.listdir(d):
                if PARTIAL in name and name.split(PARTIAL, 1)[0] in names:
                    os.remove(os.path.join(d, name))


def _resolutions(header: Mapping[str, Any]) -> dict[str, int]:
    """Stored px per side of the downsampled modalities of a plan header."""
    return {n: int(e[MANIFEST_KEY]["px"]) for n, e in header["modality_entries"].items()
            if n in header["modalities"] and MANIFEST_KEY in e}


def _check_invalid(cfg: BuildConfig, invalid: Mapping[str, str]) -> None:
    if invalid and cfg.on_error == "fail":
        examples = "; ".join(list(invalid.values())[:5])
        raise BuildError(f"{len(invalid)} invalid split rows (nothing was written): {examples}")


def _check_args(cfg: BuildConfig, header: Mapping[str, Any]) -> None:
    """A plan is used only by builds of the same content arguments (task and worker counts may differ)."""
    if "tables" not in header:
        raise BuildError(f"{cfg.out} holds a plan of an earlier version ({PLAN}); finish that build with that "
                         "version, or build into a new output location")
    want = json.loads(json.dumps({"format_version": sf.FORMAT_VERSION, "args": cfg.content_args()}))
    if {k: header.get(k) for k in want} != want:
        raise BuildError(f"{cfg.out} holds a build with other arguments or other source chips "
                         f"({PLAN} differs); use a new output location")


def plan_build(cfg: BuildConfig, registry: Registry | None = None, reuse: bool = False) -> dict[str, Any]:
    """The plan step: list and size the source once and write the plan (``plan_io``) that every task reads its
    share of. A plan already there is reused, without listing the source, when it has the same arguments and
    task layout and the source fingerprint is unchanged (or ``reuse``, for object stores whose folders have no
    modification times); otherwise the source is listed again, and a plan whose shards differ from the existing
    one's is refused once shards are built. Returns the header."""
    from shard_tools import plan_io

    cfg.check()
    registry = registry or registry_for(cfg)
    out_fs, out_root = get_fs(cfg.out, cfg.storage_options)
    fs, src = get_fs(cfg.src, cfg.src_storage_options if cfg.src_storage_options is not None else cfg.storage_options)
    existing = plan_io.read_header(out_fs, out_root)
    fp = plan_io.fingerprint(fs, src, hub.discover_regions(fs, src, cfg.regions))
    if existing is not None:
        _check_args(cfg, existing)
        same_source = existing.get("fingerprint") == fp and (fp["complete"] or reuse)
        if same_source and existing.get("num_tasks") == cfg.num_tasks:
            log.info("plan: reusing %s (same arguments and task count; source unchanged by its fingerprint)", PLAN)
            _check_invalid(cfg, existing["invalid"])
            return existing
    plan = make_plan(cfg, registry)
    _check_invalid(cfg, plan.invalid)
    header = {k: v for k, v in plan.summary(cfg).items() if k != "shards"}
    header = json.loads(json.dumps(header))
    if existing is not None:
        same = {k: existing.get(k) for k in header} == header and existing.get("num_shards") == len(plan.shards) \
            and [s["path"] for s in plan_io.iter_shards(out_fs, out_root, existing)] == [s.path for s in plan.shards]
        built = out_fs.exists(join(out_root, BUILD_DIR, "shards"))
        if not same and built:
            raise BuildError(f"{cfg.out} holds a build with other arguments or other source chips "
                             f"({PLAN} differs); use a new output location")
    header["fingerprint"] = fp
    header["resources"] = resource_hints(plan, cfg.num_tasks)
    written = plan_io.write_plan(out_fs, out_root, plan, header, cfg.num_tasks)
    log.info("plan: %d chips in %d shards (%d reading groups) for %d tasks written to %s",
             written["num_chips"], written["num_shards"], written["num_groups"], cfg.num_tasks, PLAN)
    return written


def resource_hints(plan: Plan, num_tasks: int) -> dict[str, Any]:
    """Slurm ``--mem``/``--time`` suggestions derived from the plan (documented in the README): a build worker
    holds about one chip's arrays and one shard's index rows (parquet groups also up to ``_group_pending_limit``);
    a task's time follows its share of bytes at a conservative 20 MB/s per worker. finalize and verify hold
    bounded memory (shard_tools.finalize), so their hints grow only with the sample count (8 bytes a sample)."""
    sizes = [sum(sample_size({m.name: m for m in plan.modalities}, list(c.files)) for c in s.chips)
             for s in plan.shards]
    per_task = [0] * max(1, num_tasks)
    for g, members in enumerate(plan.groups):
        per_task[g % num_tasks] += sum(sizes[i] for i in members)
    samples = sum(len(s.chips) for s in plan.shards)
    largest = max(sizes, default=0)
    gib = 2**30
    return {
        "largest_shard_bytes": largest, "largest_task_bytes": max(per_task), "total_bytes": sum(sizes),
        "samples": samples, "shards": len(plan.shards),
        "build_mem_per_worker_gib": round(2 + (3 * largest if any(s.group >= 0 for s in plan.shards) else 0) / gib, 1),
        "build_hours_one_worker": round(max(per_task) / 20e6 / 3600, 2),
        "finalize_mem_gib": round(2 + 16 * samples / gib, 1),
        "verify_mem_gib": round(2 + 16 * samples / gib, 1),
    }


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Build this task's share of the shards; with one task, finalize too. Returns the summary.

    The task reads its share of the plan written by the plan step (``m3leo-shards plan``): it lists nothing and
    touches only the source files of its own shards. Without a plan (no plan step ran), the task plans itself,
    listing the whole source, and writes the plan for the others."""
    from shard_tools import plan_io

    cfg.check()
    registry = registry_for(cfg)
    out_fs, out_root = get_fs(cfg.out, cfg.storage_options)
    header = plan_io.read_header(out_fs, out_root)
    if header is None:
        plan = make_plan(cfg, registry)
        _check_invalid(cfg, plan.invalid)
        header = json.loads(json.dumps({k: v for k, v in plan.summary(cfg).items() if k != "shards"}))
        header["resources"] = resource_hints(plan, cfg.num_tasks)
        header = plan_io.write_plan(out_fs, out_root, plan, header, cfg.num_tasks)
        # a reading group belongs to one task; without parquet regions each shard is a group: shard i, i % n
        my_groups = [[plan.shards[i] for i in g] for n, g in enumerate(plan.groups)
                     if n % cfg.num_tasks == cfg.task_index]
    else:
        _check_args(cfg, header)
        _check_invalid(cfg, header["invalid"])
        my_groups = plan_io.read_share(out_fs, out_root, header, cfg.task_index, cfg.num_tasks)
    invalid: dict[str, str] = header["invalid"]
    resolutions = _resolutions(header)
    mine = [s for g in my_groups for s in g]
    _clean_partials(out_fs, out_root, mine)
    done = {s.path for s in mine if out_fs.exists(_record_path(out_root, s.path))}
    todo = [s for s in mine if s.path not in done]
    src_opts = cfg.src_storage_options if cfg.src_storage_options is not None else cfg.storage_options
    sources = [registry[n] for n in header["modalities"]]
    tasks = [[ShardTask(s, cfg.out, cfg.storage_options, cfg.src, src_opts, sources, cfg.compress,
                        cfg.on_error, cfg.year, cfg.gunw_pair_rule, resolutions) for s in g if s.path not in done]
             for g in my_groups]
    tasks = [g for g in tasks if g]
    log.info("plan: %d shards in all, %d for task %d/%d, %d already published, %d to build",
             header["num_shards"], len(mine), cfg.task_index, cfg.num_tasks, len(mine) - len(todo), len(todo))
    totals: Counter = Counter()
    errors: list[str] = []
    chips_of = {s.path: len(s.chips) for s in todo}  # the bar's step per finished shard, looked up in O(1)
    bar = tqdm(total=sum(chips_of.values()), unit="chip", desc="build", disable=not cfg.progress)
    try:
        for result in (r for results in _run(tasks, cfg.workers) for r in results):
            totals["shards"] += 1
            totals["chips"] += result["num_samples"]
            totals["bytes"] += result["bytes"]
            totals["skipped_chips"] += result["skipped_chips"]
            totals["skipped_members"] += result["skipped_members"]
            totals["empty_members"] += result["empty_members"]
            errors += result["errors"][: max(0, ERROR_EXAMPLES - len(errors))]
            bar.update(chips_of[result["path"]])
    finally:
        bar.close()
    summary: dict[str, Any] = {
        "task": f"{cfg.task_index}/{cfg.num_tasks}",
        "shards_built": totals["shards"], "shards_already_published": len(mine) - len(todo),
        "chips": totals["chips"], "bytes": totals["bytes"],
        "skipped_chips": totals["skipped_chips"] + len(invalid), "skipped_members": totals["skipped_members"],
        "empty_members": totals["empty_members"],
        "errors": errors + list(invalid.values())[:ERROR_EXAMPLES],
        "discrepancies": header["discrepancies"],
    }
    if cfg.num_tasks == 1:
        summary["finalized"] = finalize(cfg.out, cfg.storage_options, source=cfg.src)
    else:  # this task's shards are all built: their partial index, so that finalize need not read their records
        from shard_tools.partials import write_partial

        summary["partial_index"] = write_partial(out_fs, out_root, header, cfg.task_index, cfg.num_tasks)
    return summary


def _worker_context():
    """A fork server: workers start from a clean process (no object-store event loops or sockets inherited from
    the caller, unlike plain fork) with the heavy imports already done (unlike spawn)."""
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["shard_tools.build", "shard_tools.stats", "shard_tools.tiff_raw", "rasterio", "netCDF4",
                                "torch"])
    return ctx


def _worker_init(environ: dict[str, str]) -> None:
    """Give the worker the caller's environment of now (the fork server has the one of its own start: AWS_*
    settings made since would be missing) and one core."""
    import torch

    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)


def _run(tasks: list[list[ShardTask]], workers: int):
    """Build the reading groups; yields each group's results."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield build_group(t)
        return
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=_worker_context(),
                             initializer=_worker_init, initargs=(dict(os.environ),)) as pool:
        # largest groups first (stable), so that no worker is left with a big one at the end while others idle
        largest_first = sorted(tasks, key=lambda g: -sum(len(t.shard.chips) for t in g))
        for _, result in bounded_map(pool, build_group, largest_first, workers * 2, order="completion"):
            yield result


# ------------------------------------------------------------------ finalize


def _nest(counts: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """'modality\tencoding' counts as {modality: {encoding: members}}."""
    out: dict[str, dict[str, int]] = {}
    for k, n in sorted(counts.items()):
        mod, enc = k.split("\t", 1)
        out.setdefault(mod, {})[enc] = n
    return out


def finalize(out: str, storage_options: Mapping[str, Any] | None = None, source: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Merge the shard records of all tasks into ``index.parquet``, ``stats.json`` and ``manifest.json``,
    streaming in bounded memory (:func:`shard_tools.finalize.finalize`)."""
    from shard_tools.finalize import finalize as streaming_finalize

    return streaming_finalize(out, storage_options, source, progress)
