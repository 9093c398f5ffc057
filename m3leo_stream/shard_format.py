"""The shard format contract shared by the writer (``shard_tools``) and the reader (``m3leo_stream``).

Layout of a shard root::

    <root>/manifest.json
    <root>/index.parquet
    <root>/stats.json
    <root>/<region>/<split>/<region>-<split>-NNNNNN.tar

A sample's members are ``<key>.json`` and ``<key>.<modality>.npy`` (``.npy.zst`` when compressed). Arrays are
C-order ``.npy`` (format 1.0, never pickled) in the modality's registry dtype and canonical shape, bands first.

Checksums (format version 2): the index holds, per member, ``<modality>_xxh3`` (``json_xxh3`` for the metadata
member), the XXH3-64 digest (``xxhash.xxh3_64``, seed 0) of the member's stored bytes, as uint64. An uncompressed
array member is preceded in its sample by ``<key>.<modality>.xxh3``: the little-endian uint64 digests of the array
member's chunks, its ``.npy`` header then each band plane (``(H, W)`` bytes, in storage order), whose own digest is
the index's ``<modality>_chunks_xxh3``. A read of some bands only fetches that small member with the ``.npy`` header
(it lies just before, :func:`chunk_digests_range`) and checks each fetched band exactly, while the index holds one
number per member whatever the band count. Version 1 roots have no checksums; they are read unverified.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import xxhash

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no checksums
CHECKSUM = "xxh3_64"  # the manifest's ``checksum`` names the digest of the checksum columns
MANIFEST = "manifest.json"
INDEX = "index.parquet"
STATS = "stats.json"
SPLITS = ("train", "val", "test")
KEY_RE = re.compile(r"[0-9a-z_-]+")

JSON_MEMBER = "json"  # index columns json_offset / json_nbytes / json_xxh3 locate each sample's metadata member
BASE_INDEX_COLUMNS = ("key", "region", "split", "shard", "lon", "lat")


class FormatError(ValueError):
    """A shard root, shard or member that breaks the format contract."""


def shard_name(region: str, split: str, number: int) -> str:
    """Path of a shard relative to the root."""
    return f"{region}/{split}/{region}-{split}-{number:06d}.tar"


def member_name(key: str, modality: str | None, compressed: bool = False) -> str:
    """Tar member name: ``<key>.json`` for ``modality=None``, else ``<key>.<modality>.npy[.zst]``."""
    if modality is None:
        return f"{key}.json"
    return f"{key}.{modality}.npy" + (".zst" if compressed else "")


def check_key(key: str) -> str:
    """Keys become tar basenames: no dots (webdataset splits on them), no slashes."""
    if not KEY_RE.fullmatch(key):
        raise FormatError(f"sample key {key!r} must match {KEY_RE.pattern} (no dots or slashes)")
    return key


def offset_column(modality: str) -> str:
    return f"{modality}_offset"


def nbytes_column(modality: str) -> str:
    return f"{modality}_nbytes"


def checksum_column(member: str) -> str:
    """The column of a member's digest (``member``: a modality or :data:`JSON_MEMBER`)."""
    return f"{member}_xxh3"


def chunks_checksum_column(modality: str) -> str:
    """The column of the digest of an uncompressed member's chunk-digest member."""
    return f"{modality}_chunks_xxh3"


def chunk_digests_name(key: str, modality: str) -> str:
    """Tar member holding the chunk digests of ``<key>.<modality>.npy``."""
    return f"{key}.{modality}.xxh3"


def chunk_digests_range(offset: int, num_bands: int) -> tuple[int, int]:
    """(data offset, size) of the chunk-digest member before the uncompressed array member whose data starts at
    ``offset``: it holds ``1 + num_bands`` digests, and the array member's 512-byte tar header lies between them."""
    size = 8 * (1 + num_bands)
    return offset - 512 - (size + (-size) % 512), size


def digest(*chunks: bytes | bytearray | memoryview | np.ndarray) -> int:
    """XXH3-64 of the concatenated ``chunks`` (hashed in place, without joining them)."""
    h = xxhash.xxh3_64()
    for c in chunks:
        h.update(c)
    return h.intdigest()


def chunk_digests(header: bytes | bytearray | memoryview, body: memoryview | np.ndarray, num_bands: int) -> bytes:
    """The chunk-digest member of an uncompressed array member: digests of its ``.npy`` header, then of each of its
    ``num_bands`` planes, as little-endian uint64."""
    body = memoryview(body).cast("B")
    plane = len(body) // max(1, num_bands)
    digests = [xxhash.xxh3_64_intdigest(header)] + [xxhash.xxh3_64_intdigest(body[i * plane:(i + 1) * plane])
                                                     for i in range(num_bands)]
    return np.asarray(digests, dtype="<u8").tobytes()


def index_schema(bands: Mapping[str, int], compressed: bool) -> Any:
    """The pyarrow schema of ``index.parquet`` for modalities with these band counts (name → bands, in order):
    :data:`BASE_INDEX_COLUMNS`, the metadata member's range and digest, then each modality's."""
    import pyarrow as pa

    fields = [pa.field("key", pa.string()), pa.field("region", pa.string()), pa.field("split", pa.string()),
              pa.field("shard", pa.string()), pa.field("lon", pa.float64()), pa.field("lat", pa.float64())]
    for member in (JSON_MEMBER, *bands):
        fields += [pa.field(offset_column(member), pa.int64()), pa.field(nbytes_column(member), pa.int64()),
                   pa.field(checksum_column(member), pa.uint64())]
        if member != JSON_MEMBER and not compressed:
            fields.append(pa.field(chunks_checksum_column(member), pa.uint64()))
    return pa.schema(fields)


def encode_array(array: np.ndarray) -> bytes:
    """``.npy`` bytes (format 1.0, C order, no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def npy_header_size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Size of the ``.npy`` header :func:`encode_array` writes for an array of this shape and dtype."""
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.empty((0,), dtype=dtype))
    header["shape"] = tuple(shape)
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue())


_AST_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1024)
def _parse_header_text(text: bytes) -> tuple[Any, tuple[int, ...], bool]:
    """The header dict's fields. Readers parse headers from several threads, and CPython 3.11's
    ``ast.literal_eval`` is not safe under concurrent use ("AST constructor recursion depth mismatch"), so parsing
    is serialised; headers repeat for every sample of a modality, so the cache makes that free."""
    with _AST_LOCK:
        header = ast.literal_eval(text.decode("latin1"))
    return header["descr"], tuple(int(x) for x in header["shape"]), bool(header["fortran_order"])


def npy_header(data: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """``(dtype, shape, fortran_order, data_offset)`` of an ``.npy`` header, parsed without pickle."""
    mv = memoryview(data)
    if bytes(mv[:6]) != b"\x93NUMPY":
        raise FormatError("not an .npy member (bad magic)")
    major = mv[6]
    hlen_size = 2 if major == 1 else 4
    hlen = int.from_bytes(mv[8 : 8 + hlen_size], "little")
    start = 8 + hlen_size + hlen
    try:
        descr, shape, fortran = _parse_header_text(bytes(mv[8 + hlen_size : start]))
        dtype = np.dtype(descr)
    except Exception as e:  # noqa: BLE001 - any malformed header
        raise FormatError(f"bad .npy header: {e}") from None
    if dtype.hasobject:
        raise FormatError("object arrays are not allowed")
    return dtype, shape, fortran, start


def decode_array(data: bytes | memoryview, compressed: bool = False, where: str = "") -> np.ndarray:
    """Parse ``.npy`` (optionally zstd-framed) bytes without pickle, zero-copy where possible."""
    try:
        if compressed:
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(data)
        mv = memoryview(data)
        dtype, shape, fortran, start = npy_header(mv)
        count = int(np.prod(shape)) if shape else 1
        if len(mv) - start != count * dtype.itemsize:
            raise FormatError(f"truncated array: {len(mv) - start} bytes for shape {shape} {dtype}")
        arr = np.frombuffer(mv, dtype=dtype, count=count, offset=start)
        return arr.reshape(shape, order="F" if fortran else "C")
    except FormatError as e:
        raise FormatError(f"{where}: {e}" if where else str(e)) from None
    except Exception as e:  # zstd
        raise FormatError(f"{where}: cannot decode member: {e}" if where else f"cannot decode member: {e}") from e


def dumps_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no NaN literals)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def loads_manifest(data: bytes | str) -> dict[str, Any]:
    manifest = json.loads(data)
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise FormatError(f"manifest format_version {version!r}; this reader understands {READABLE_VERSIONS}")
    if version >= 2 and manifest.get("checksum") != CHECKSUM:
        raise FormatError(f"manifest checksum {manifest.get('checksum')!r}; this reader understands {CHECKSUM!r}")
    return manifest


def has_checksums(manifest: Mapping[str, Any]) -> bool:
    """Whether the index holds member checksums (format version 2 and later)."""
    return int(manifest.get("format_version", 1)) >= 2


def manifest_regions(manifest: Mapping[str, Any]) -> list[str]:
    """Regions in manifest order; ``region`` tensors in batches index into this list."""
    return list(manifest["regions"])
