"""The error of the shard format."""

from __future__ import annotations


class FormatError(ValueError):
    """A shard root, shard or member that breaks the format contract."""
