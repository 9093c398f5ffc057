"""Member digests: XXH3-64 (seed 0) of stored bytes, and the chunk digests of an uncompressed array member."""

from __future__ import annotations

import numpy as np
import xxhash

CHECKSUM = "xxh3_64"  # the manifest's ``checksum`` names the digest of the checksum columns


def digest(*chunks: bytes | bytearray | memoryview) -> int:
    """XXH3-64 of the concatenated ``chunks`` (hashed in place, without joining them)."""
    h = xxhash.xxh3_64()
    for c in chunks:
        h.update(c)
    return h.intdigest()


def chunk_digests(header: bytes | bytearray | memoryview, body: memoryview, num_bands: int) -> bytes:
    """The chunk-digest member of an uncompressed array member: digests of its ``.npy`` header, then of each of its
    ``num_bands`` planes, as little-endian uint64."""
    body = memoryview(body).cast("B")
    plane = len(body) // max(1, num_bands)
    digests = [xxhash.xxh3_64_intdigest(header)] + [xxhash.xxh3_64_intdigest(body[i * plane:(i + 1) * plane])
                                                     for i in range(num_bands)]
    return np.asarray(digests, dtype="<u8").tobytes()
