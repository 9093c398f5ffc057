"""Where things are in a shard root: file names, shard and member names, sample keys and the index columns."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from m3leo_stream.shard_format.errors import FormatError

MANIFEST = "manifest.json"
INDEX = "index.parquet"
STATS = "stats.json"
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
KEY_RE = re.compile(r"[0-9a-z_-]+")

JSON_MEMBER = "json"  # index columns json_offset / json_nbytes / json_xxh3 locate each sample's metadata member
BASE_INDEX_COLUMNS = ("key", "region", "split", "shard", "lon", "lat")


def shard_name(region: str, split: str, number: int) -> str:
    """Path of a shard relative to the root."""
    return f"{region}/{split}/{region}-{split}-{number:06d}.tar"


def member_name(key: str, modality: str | None, compressed: bool = False) -> str:
    """Tar member name: ``<key>.json`` for ``modality=None``, else ``<key>.<modality>.npy[.zst]``."""
    if modality is None:
        return f"{key}.json"
    return f"{key}.{modality}.npy" + (".zst" if compressed else "")


def chunk_digests_name(key: str, modality: str) -> str:
    """Tar member holding the chunk digests of ``<key>.<modality>.npy``."""
    return f"{key}.{modality}.xxh3"


def check_key(key: str) -> str:
    """Keys become tar basenames: no dots (webdataset splits on them), no slashes."""
    if not KEY_RE.fullmatch(key):
        raise FormatError(f"sample key {key!r} must match {KEY_RE.pattern} (no dots or slashes)")
    return key


def loads_object(data: bytes | str, where: str) -> Mapping[str, Any]:
    """A JSON object from ``data``; a :class:`FormatError` naming ``where`` when it is not one."""
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise FormatError(f"{where}: not JSON: {e}") from None
    if not isinstance(obj, Mapping):
        raise FormatError(f"{where}: not a JSON object")
    return obj


def dumps_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no NaN literals): the encoding of a sample's metadata member."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


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


def chunk_digests_range(offset: int, num_bands: int) -> tuple[int, int]:
    """(data offset, size) of the chunk-digest member before the uncompressed array member whose data starts at
    ``offset``: it holds ``1 + num_bands`` digests, and the array member's 512-byte tar header lies between them."""
    size = 8 * (1 + num_bands)
    return offset - 512 - (size + (-size) % 512), size


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
