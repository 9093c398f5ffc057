"""Opening shard roots on local disk or any fsspec URL (``s3://bucket/prefix``), and ranged reads with retries.

S3 endpoints and credentials come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or from ``storage_options``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")


def parse_storage_options(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Accept a JSON string (from a CLI flag), a mapping or None."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--storage-options is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError("--storage-options must be a JSON object")
        return parsed
    return dict(value)


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path for ``url``. For s3 the AWS environment supplies endpoint and credentials."""
    opts = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
            opts["endpoint_url"] = endpoint
    fs, path = url_to_fs(url, **opts)
    return fs, path.rstrip("/") if path != "/" else path


def single_attempt(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` for a client whose every retry is ours (counted, with a deadline): for s3, botocore's own
    retry handler (which retries 5xx and throttling silently, 5 attempts by default) is set to one attempt, unless the
    options already say how botocore retries."""
    opts = dict(storage_options or {})
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return opts
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    opts["config_kwargs"] = config
    return opts


DEFAULT_POOL_CONNECTIONS = 10
"""botocore's connection pool per client (``max_pool_connections``): requests beyond it queue for a connection."""


def connection_pool(url: str, storage_options: Mapping[str, Any] | None, connections: int) -> dict[str, Any]:
    """``storage_options`` for a client that keeps ``connections`` requests in flight: for s3, a connection pool of
    at least that many (``config_kwargs.max_pool_connections``), so that none of them waits for a connection; unless
    the options already set the pool's size."""
    opts = dict(storage_options or {})
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return opts
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", max(DEFAULT_POOL_CONNECTIONS, int(connections)))
    opts["config_kwargs"] = config
    return opts


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local_url(url: str) -> bool:
    """Whether ``url`` names local files (a path, or ``file://``)."""
    return "://" not in url or url.split("://", 1)[0] in ("file", "local")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


TRANSIENT_NAMES = (
    "Timeout", "TimeoutError", "ReadTimeout", "ConnectTimeout", "ConnectionError", "ConnectionResetError",
    "ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "EndpointConnectionError",
    "ConnectionClosedError", "IncompleteReadError", "ResponseStreamingError", "BrokenPipeError",
    "ReadTimeoutError", "ConnectTimeoutError", "ProtocolError", "ContentLengthError",
)
"""Exception classes (or base classes, by name: botocore, aiohttp, urllib3) of network faults worth retrying."""

TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "TooManyRequestsException", "RequestThrottled",
})
"""Service error codes (S3 and AWS-style ``Error.Code``) that mean "try again"."""

PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` may help: decided from exception types, the HTTP status and the service's error code
    (never from message text: a shard named ``…-000503.tar`` is not a 503). Timeouts, resets, throttling, 408, 429
    and 5xx are transient; missing objects, refused permissions and other 4xx are not. The exception's cause chain
    is followed until one of these decides."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, PERMANENT_TYPES):
            return False
        if _error_code(e) in TRANSIENT_CODES:
            return True
        status = _http_status(e)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(e, (TimeoutError, ConnectionError)) or any(c.__name__ in TRANSIENT_NAMES
                                                                 for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def _error_code(e: BaseException) -> str | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = (resp.get("Error") or {}).get("Code")
        return str(code) if code else None
    return None


def _http_status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return int(status)
    status = getattr(e, "status", None) or getattr(e, "status_code", None)
    return int(status) if isinstance(status, int) else None


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a per-operation deadline."""

    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float = 120.0
    max_attempts: int = 1000

    def delays(self, rng: random.Random):
        attempt = 0
        while True:
            cap = min(self.max_delay, self.base_delay * (2**attempt))
            yield rng.uniform(0, cap)
            attempt += 1


@dataclass
class IOCounters:
    """Counters a reader accumulates; summed across workers for logging."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    failures: int = 0
    substitutions: int = 0
    checksum_failures: int = 0  # members whose bytes did not match the index's digest when read
    cache_hits: int = 0  # samples served from the node-local cache (their bytes are not in ``bytes``)
    cache_bytes: int = 0

    def add(self, other: IOCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def with_retries(
    op: Callable[[], T],
    what: str,
    policy: RetryPolicy,
    counters: IOCounters | None = None,
    rng: random.Random | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``op``; retry transient errors with backoff and jitter until ``policy.deadline``.

    Raises the last error, wrapped in an ``OSError`` naming ``what``, when the deadline passes or the error is not
    transient.
    """
    rng = rng or random.Random()
    start = time.monotonic()
    delays = policy.delays(rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except Exception as e:  # noqa: BLE001 - classified below
            elapsed = time.monotonic() - start
            if not is_transient(e):
                raise
            delay = next(delays)
            if attempt >= policy.max_attempts or elapsed + delay > policy.deadline:
                if counters is not None:
                    counters.failures += 1
                raise OSError(f"{what}: still failing after {attempt} attempts in {elapsed:.1f} s: {e!r}") from e
            if counters is not None:
                counters.retries += 1
            if on_retry is not None:
                on_retry(e)
            log.debug("retrying %s after %r (attempt %d, sleeping %.2f s)", what, e, attempt, delay)
            time.sleep(delay)
