"""``m3leo-shards verify`` and ``stats``: check a shard root end to end, recompute its statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from m3leo_stream import shard_format as sf
from m3leo_stream.shard_root import ShardRoot
from shard_tools.publish import pipe_atomic
from shard_tools.stats import StatsSet

log = logging.getLogger(__name__)


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_shard(root: ShardRoot, entry: Mapping[str, Any], rows: list[dict[str, Any]],
                 modalities: Mapping[str, Any], checksums: bool) -> list[str]:
    problems: list[str] = []
    path = entry["path"]
    full = root.file(path)
    if not root.fs.exists(full):
        return [f"{path}: listed in the manifest but missing"]
    members: dict[str, tuple[int, int]] = {}
    digests: dict[str, int] = {}  # member → its digest
    chunks: dict[str, bytes] = {}  # array member → the chunk digests its bytes give
    stored: dict[str, bytes] = {}  # array member → its chunk-digest member
    decoded: list[str] = []
    with root.fs.open(full, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for ti in tar:
                    members[ti.name] = (ti.offset_data, ti.size)
                    data = tar.extractfile(ti).read() if ti.isfile() else b""  # type: ignore[union-attr]
                    digests[ti.name] = sf.digest(data)
                    parts = ti.name.split(".")
                    if len(parts) == 3 and parts[1] in modalities and parts[2] == "xxh3":
                        stored[f"{parts[0]}.{parts[1]}.npy"] = data
                    elif len(parts) >= 3 and parts[1] in modalities:
                        m = modalities[parts[1]]
                        if not ti.name.endswith(".zst"):
                            try:
                                start = sf.npy_header(data)[3]
                                chunks[ti.name] = sf.chunk_digests(data[:start], memoryview(data)[start:],
                                                                   m["shape"][0])
                            except sf.FormatError:
                                pass  # the decode below says what is wrong
                        try:
                            arr = sf.decode_array(data, compressed=ti.name.endswith(".zst"), where=f"{path}:{ti.name}")
                        except sf.FormatError as e:
                            decoded.append(str(e))
                            continue
                        if tuple(arr.shape) != tuple(m["shape"]) or arr.dtype.name != m["dtype"]:
                            decoded.append(f"{path}:{ti.name}: array {arr.shape} {arr.dtype}, manifest says "
                                           f"{tuple(m['shape'])} {m['dtype']}")
        except tarfile.TarError as e:
            problems.append(f"{path}: not a readable tar ({e})")
        reader.drain()
    problems += decoded
    if reader.n != entry["bytes"]:
        problems.append(f"{path}: {reader.n} bytes, manifest says {entry['bytes']}")
    if reader.sha.hexdigest() != entry["sha256"]:
        problems.append(f"{path}: sha256 {reader.sha.hexdigest()} differs from the manifest's {entry['sha256']}")
    keys = {r["key"] for r in rows}
    if len(rows) != entry["num_samples"]:
        problems.append(f"{path}: index has {len(rows)} samples, manifest says {entry['num_samples']}")
    json_members = {n for n in members if n.endswith(".json")}
    if len(json_members) != entry["num_samples"]:
        problems.append(f"{path}: tar holds {len(json_members)} samples, manifest says {entry['num_samples']}")
    for name in sorted(json_members):
        if name[: -len(".json")] not in keys:
            problems.append(f"{path}: member {name} has no index row")
    ext = ".npy.zst" if root.compressed else ".npy"
    for r in rows:
        for mod in [sf.JSON_MEMBER, *modalities]:
            off, n = r.get(sf.offset_column(mod)), r.get(sf.nbytes_column(mod))
            name = f"{r['key']}.json" if mod == sf.JSON_MEMBER else f"{r['key']}.{mod}{ext}"
            if off is None:
                if name in members:
                    problems.append(f"{path}: member {name} exists but the index has no range for it")
                continue
            if name not in members:
                problems.append(f"{path}: index range for {name} but no such member")
                continue
            if members[name] != (off, n):
                problems.append(f"{path}: index range of {name} is ({off}, {n}), tar member is at {members[name]}")
            if checksums:
                problems += _check_digests(path, name, r, mod, digests[name], chunks.get(name), stored.get(name))
    return problems


def _check_digests(path: str, name: str, row: Mapping[str, Any], member: str, found: int,
                   chunks: bytes | None, stored: bytes | None) -> list[str]:
    """The member's digest in the index against that of its bytes in the tar; for uncompressed arrays, also its
    chunk-digest member against the chunks of its bytes and against the index."""
    want = row.get(sf.checksum_column(member))
    if want != found:
        return [f"{path}: member {name} hashes to {found:016x}, the index says "
                f"{'nothing' if want is None else f'{want:016x}'}"]
    if chunks is None:
        return []
    if stored is None:
        return [f"{path}: member {name} has no chunk-digest member before it"]
    if stored != chunks:
        n = min(len(stored), len(chunks)) // 8
        bad = next((i for i in range(n) if stored[8 * i:8 * i + 8] != chunks[8 * i:8 * i + 8]), n)
        what = ".npy header" if bad == 0 else f"band {bad - 1}"
        return [f"{path}: member {name}: the digest of its {what} differs from its chunk-digest member"]
    if row.get(sf.chunks_checksum_column(member)) != sf.digest(stored):
        return [f"{path}: member {name}: its chunk-digest member does not hash to the index's "
                f"{sf.chunks_checksum_column(member)}"]
    return []


def verify(out: str, storage_options: Mapping[str, Any] | None = None, workers: int = 4,
           progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    """Check every shard's size and sha256, every index range and member digest against the tar, and counts;
    return problems."""
    root = ShardRoot(out, storage_options)
    problems: list[str] = []
    manifest = root.manifest
    index = root.read_index().to_pylist()
    modalities = manifest["modalities"]
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in index:
        by_shard.setdefault(r["shard"], []).append(r)
    listed = {s["path"] for s in manifest["shards"]}
    for s in sorted(set(by_shard) - listed):
        problems.append(f"{s}: in the index but not in the manifest")
    on_disk = {p[len(root.path) + 1:] for p in root.fs.glob(root.file("*/*/*.tar"))}
    for s in sorted(on_disk - listed):
        problems.append(f"{s}: tar file not listed in the manifest")
    if len(index) != manifest.get("num_samples", len(index)):
        problems.append(f"index has {len(index)} rows, manifest says {manifest['num_samples']}")
    dup = len(index) - len({(r["region"], r["key"]) for r in index})
    if dup:
        problems.append(f"index has {dup} duplicate keys")
    bar = tqdm(total=len(manifest["shards"]), unit="shard", desc="verify", disable=not progress)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checksums = sf.has_checksums(manifest)
        if not checksums:
            log.warning("%s has no member checksums (format version %s): members are checked by the shards' sha256 "
                        "only", out, manifest.get("format_version"))
        futs = [pool.submit(_check_shard, root, e, by_shard.get(e["path"], []), modalities, checksums)
                for e in manifest["shards"]]
        for fut in futs:
            problems += fut.result()
            bar.update(1)
    bar.close()
    summary = {"shards": len(manifest["shards"]), "samples": len(index), "problems": len(problems)}
    return problems, summary


def recompute_stats(out: str, storage_options: Mapping[str, Any] | None = None, progress: bool = True) -> str:
    """Recompute ``stats.json`` from the train split's members and publish it atomically."""
    root = ShardRoot(out, storage_options)
    mods = root.modalities
    names = list(mods)
    stats = StatsSet(mods.values())
    index = root.read_index(filters=[("split", "=", "train")]).to_pylist()
    for r in tqdm(index, unit="sample", desc="stats", disable=not progress):
        for name in names:
            if r.get(sf.offset_column(name)) is not None:
                stats.add(r["region"], name, root.read_member(r, name))
    path = root.file(sf.STATS)
    pipe_atomic(root.fs, path, json.dumps(stats.to_json(), indent=1, allow_nan=False).encode())
    return path
