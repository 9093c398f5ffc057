"""``manifest.json``: what a shard root holds and how it was built; written last by ``finalize`` (its presence is
the commit point readers look for)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from m3leo_stream.shard_format.checksums import CHECKSUM
from m3leo_stream.shard_format.errors import FormatError
from m3leo_stream.shard_format.layout import MANIFEST, loads_object

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no checksums
Compression = Literal["none", "zstd"]
REQUIRED = ("format_version", "regions", "num_samples", "modalities", "shards")


class ShardEntry(TypedDict):
    """One shard of the manifest's ``shards`` list."""

    path: str  # relative to the root (:func:`~m3leo_stream.shard_format.layout.shard_name`)
    region: str
    split: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True, eq=False)
class Manifest(Mapping[str, Any]):
    """A parsed ``manifest.json``; also a read-only mapping of its JSON fields (``manifest["shards"]``).

    :meth:`to_json` writes the fields in the order declared here (``checksum`` only when set); keys this version
    does not know are kept in ``extra`` and written after them."""

    format_version: int
    regions: list[str]
    num_samples: int
    modalities: dict[str, dict[str, Any]]  # name → registry entry (``Modality.to_json``) the shards were built with
    shards: list[ShardEntry]
    checksum: str | None = None  # the digest of the index's checksum columns (format version 2)
    created: str | None = None  # ISO 8601, UTC
    source: str | None = None
    builder: dict[str, Any] = field(default_factory=dict)  # {"tool", "version", "args"}
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # region → split → samples
    members: dict[str, int] = field(default_factory=dict)  # modality → samples holding it
    compression: Compression = "none"
    source_folders: dict[str, dict[str, str]] = field(default_factory=dict)  # region → modality → folder
    discrepancies: dict[str, Any] = field(default_factory=dict)  # what → {"count", "examples"}
    skipped: dict[str, Any] = field(default_factory=dict)  # {"chips", "members", "examples"}
    empty_members: dict[str, Any] = field(default_factory=dict)  # {"count", "examples"}
    source_encodings: dict[str, dict[str, int]] = field(default_factory=dict)  # modality → encoding → members
    extra: dict[str, Any] = field(default_factory=dict)

    ORDER = ("format_version", "checksum", "created", "source", "builder", "regions", "splits", "num_samples",
             "members", "compression", "modalities", "source_folders", "shards", "discrepancies", "skipped",
             "empty_members", "source_encodings")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = MANIFEST) -> Manifest:
        """The manifest of parsed JSON, refused unless this reader understands its version and checksum."""
        version = obj.get("format_version")
        if version not in READABLE_VERSIONS:
            raise FormatError(f"{where}: manifest format_version {version!r}; this reader understands "
                              f"{READABLE_VERSIONS}")
        if version >= 2 and obj.get("checksum") != CHECKSUM:
            raise FormatError(f"{where}: manifest checksum {obj.get('checksum')!r}; this reader understands "
                              f"{CHECKSUM!r}")
        missing = [k for k in REQUIRED if k not in obj]
        if missing:
            raise FormatError(f"{where}: manifest has no {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in obj.items() if k in known},
                   extra={k: v for k, v in obj.items() if k not in known})

    @classmethod
    def loads(cls, data: bytes | str, where: str = MANIFEST) -> Manifest:
        obj = loads_object(data, where)
        return cls.from_json(obj, where)

    def as_json(self) -> dict[str, Any]:
        """The JSON object, in :attr:`ORDER`."""
        out = {k: getattr(self, k) for k in self.ORDER if k != "checksum" or self.checksum is not None}
        return {**out, **self.extra}

    def to_json(self) -> bytes:
        """The bytes of ``manifest.json``."""
        return json.dumps(self.as_json(), indent=1, allow_nan=False).encode()

    @property
    def compressed(self) -> bool:
        return self.compression == "zstd"

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key in self.ORDER and (key != "checksum" or self.checksum is not None):
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_json())

    def __len__(self) -> int:
        return len(self.as_json())

    def __repr__(self) -> str:
        return (f"Manifest(format_version={self.format_version}, samples={self.num_samples}, "
                f"shards={len(self.shards)}, regions={self.regions}, modalities={list(self.modalities)})")


def loads_manifest(data: bytes | str, where: str = MANIFEST) -> Manifest:
    """:meth:`Manifest.loads`."""
    return Manifest.loads(data, where)


def has_checksums(manifest: Mapping[str, Any]) -> bool:
    """Whether the index holds member checksums (format version 2 and later)."""
    return int(manifest.get("format_version", 1)) >= 2


def manifest_regions(manifest: Mapping[str, Any]) -> list[str]:
    """Regions in manifest order; ``region`` tensors in batches index into this list."""
    return list(manifest["regions"])
