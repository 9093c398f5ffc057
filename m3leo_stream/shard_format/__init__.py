"""The shard format contract shared by the writer (``shard_tools``) and the reader (``m3leo_stream``); the same
text for users is ``docs/format.md``.

Layout of a shard root (:mod:`.layout`)::

    <root>/manifest.json                                      what the root holds (:mod:`.manifest`), written last
    <root>/index.parquet                                      one row per sample: where its members are
    <root>/stats.json                                         per-band statistics of the train split (:mod:`.stats`)
    <root>/<region>/<split>/<region>-<split>-NNNNNN.tar       plain ustar shards, one region and split each

Members: a sample's members lie contiguously in one shard, in this order: ``<key>.json`` (its metadata: key,
region, split, lon, lat, bounds, crs and per modality the source, its shape and encoding, as sorted compact JSON),
then per modality, uncompressed, ``<key>.<modality>.xxh3`` (its chunk digests) and ``<key>.<modality>.npy``, or,
compressed, ``<key>.<modality>.npy.zst``. Keys match ``[0-9a-z_-]+``. Arrays (:mod:`.npy`) are C-order ``.npy``
(format 1.0, never pickled) in the modality's registry dtype and canonical shape, bands first; a compressed member
is one zstd frame of those bytes.

Index columns (:func:`.layout.index_schema`): ``key, region, split, shard`` (strings), ``lon, lat`` (float64),
``json_offset, json_nbytes`` (int64) and ``json_xxh3`` (uint64), then per modality ``<m>_offset, <m>_nbytes``
(int64: the data range of its member in the shard), ``<m>_xxh3`` (uint64) and, uncompressed, ``<m>_chunks_xxh3``
(uint64); a modality's columns are null in rows without it.

Checksums (:mod:`.checksums`, format version 2): ``<member>_xxh3`` is the XXH3-64 digest (``xxhash.xxh3_64``, seed
0) of the member's stored bytes, as uint64. An uncompressed array member is preceded in its sample by
``<key>.<modality>.xxh3``: the little-endian uint64 digests of the array member's chunks, its ``.npy`` header then
each band plane (``(H, W)`` bytes, in storage order), whose own digest is the index's ``<modality>_chunks_xxh3``. A
read of some bands only fetches that small member with the ``.npy`` header (it lies just before,
:func:`.layout.chunk_digests_range`) and checks each fetched band exactly, while the index holds one number per
member whatever the band count. Version 1 roots have no checksums; they are read unverified.

Versions: ``manifest.json``'s ``format_version`` is :data:`FORMAT_VERSION` when written; readers take
:data:`READABLE_VERSIONS` and, from version 2, require ``checksum`` = :data:`CHECKSUM`.

A new index column or statistic is declared here (:func:`.layout.index_schema`, :mod:`.stats`) and written by its
one writer (``shard_tools.writer`` and ``shard_tools.finalize`` for the index, ``shard_tools.stats`` for
statistics); every reader goes through this package.
"""

from m3leo_stream.shard_format.checksums import CHECKSUM, chunk_digests, digest
from m3leo_stream.shard_format.errors import FormatError
from m3leo_stream.shard_format.layout import (
    BASE_INDEX_COLUMNS,
    INDEX,
    JSON_MEMBER,
    KEY_RE,
    MANIFEST,
    SPLITS,
    STATS,
    Split,
    check_key,
    checksum_column,
    chunk_digests_name,
    chunk_digests_range,
    chunks_checksum_column,
    dumps_json,
    index_schema,
    member_name,
    nbytes_column,
    offset_column,
    shard_name,
)
from m3leo_stream.shard_format.manifest import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    Compression,
    Manifest,
    ShardEntry,
    has_checksums,
    loads_manifest,
    manifest_regions,
)
from m3leo_stream.shard_format.npy import decode_array, encode_array, npy_header, npy_header_size, npy_parts
from m3leo_stream.shard_format.stats import (
    BAND_FIELDS,
    PERCENTILES,
    BandStats,
    Stats,
    StatsError,
    dumps_stats,
    percentile_key,
)

__all__ = [
    "BAND_FIELDS", "BASE_INDEX_COLUMNS", "CHECKSUM", "FORMAT_VERSION", "INDEX", "JSON_MEMBER", "KEY_RE", "MANIFEST",
    "PERCENTILES", "READABLE_VERSIONS", "SPLITS", "STATS", "BandStats", "Compression", "FormatError", "Manifest",
    "ShardEntry", "Split",
    "Stats", "StatsError", "check_key", "checksum_column", "chunk_digests", "chunk_digests_name",
    "chunk_digests_range", "chunks_checksum_column", "decode_array", "digest", "dumps_json", "dumps_stats",
    "encode_array", "has_checksums", "index_schema", "loads_manifest", "manifest_regions", "member_name",
    "nbytes_column", "npy_header", "npy_header_size", "npy_parts", "offset_column", "percentile_key", "shard_name",
]
