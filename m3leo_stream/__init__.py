"""m3leo-stream: exact, resumable streaming of M3LEO shards with device-side transforms."""

from __future__ import annotations

__version__ = "0.1.0"
