"""The transient/permanent classifier of storage errors: decided by exception types, HTTP status and the service's
error code, never by message text; and what the reader does with each over a real S3 endpoint."""

from __future__ import annotations

import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from m3leo_stream.storage import RetryPolicy, is_transient, with_retries


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("code,status,transient", [
    ("SlowDown", 503, True), ("ServiceUnavailable", 503, True), ("InternalError", 500, True),
    ("RequestTimeout", 400, True), ("Throttling", 400, True), ("", 502, True), ("", 429, True), ("", 408, True),
    ("NoSuchKey", 404, False), ("AccessDenied", 403, False), ("InvalidRange", 416, False), ("NoSuchBucket", 404, False),
])
def test_service_errors_by_status_and_code(code, status, transient):
    assert is_transient(client_error(code, status)) is transient


def test_message_text_decides_nothing():
    assert not is_transient(FileNotFoundError("s3://b/conus/train/conus-train-000503.tar"))
    assert not is_transient(OSError("conus-train-000503.tar: InternalError in the name only"))
    assert not is_transient(ValueError("SlowDown"))


def raised_from(outer: type[OSError], inner: BaseException) -> OSError:
    """``outer`` raised from ``inner`` (as s3fs translates botocore errors), caught."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer("translated") from e
    except OSError as caught:
        return caught


def test_wrapped_errors_follow_the_cause_chain():
    assert is_transient(raised_from(OSError, client_error("SlowDown", 503)))
    assert not is_transient(raised_from(FileNotFoundError, client_error("NoSuchKey", 404)))
    assert not is_transient(raised_from(OSError, client_error("AccessDenied", 403)))


def test_network_faults_are_transient():
    import aiohttp

    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(aiohttp.ServerDisconnectedError())
    assert is_transient(aiohttp.ClientPayloadError("truncated body"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())


def test_a_permanent_error_is_not_retried():
    calls = []

    def op():
        calls.append(1)
        raise FileNotFoundError("conus-train-000503.tar")

    t = time.monotonic()
    with pytest.raises(FileNotFoundError):
        with_retries(op, "x", RetryPolicy(deadline=60))
    assert len(calls) == 1 and time.monotonic() - t < 1


@pytest.mark.s3
@pytest.mark.parametrize("damage", ["deleted", "truncated", "cut inside"])
def test_missing_or_truncated_shard_on_s3_fails_at_once_naming_it(s3, uneven_shards, damage):
    """A deleted shard object, one cut before a member (the range cannot be served) and one cut inside it (a
    shorter body): each fails at once (no retries to the deadline), naming shard, key and member."""
    import s3fs

    from m3leo_stream.datamodule import M3LEODataModule
    from m3leo_stream.reader import UnreadableSample

    bucket = s3.new_bucket()
    fs = s3fs.S3FileSystem(endpoint_url=s3.url, key="testing", secret="testing")
    fs.put(str(uneven_shards), f"{bucket}/shards", recursive=True)
    dm = M3LEODataModule(f"s3://{bucket}/shards", inputs=["modisveg"], targets=["esawc"], batch_size=4,
                         num_workers=0, retry={"deadline": 60})
    dm.setup()
    first = next(iter(dm.train_dataloader()))["key"][0]
    ix = dm._index
    row = list(ix.key).index(first.encode())
    shard = ix.shard_names[ix.shard[row]]
    obj = f"{bucket}/shards/{shard}"
    if damage == "deleted":
        fs.rm(obj)
    else:
        cut = 1024 if damage == "truncated" else int(min(ix.offsets["modisveg"][row], ix.offsets["esawc"][row])) + 64
        fs.pipe(obj, fs.cat_file(obj)[:cut])
    t = time.monotonic()
    with pytest.raises(UnreadableSample) as err:
        next(iter(dm.train_dataloader()))
    assert time.monotonic() - t < 5, "retried a permanent error"
    msg = str(err.value)
    assert shard in msg and first in msg and ("modisveg" in msg or "esawc" in msg), msg
    want = {"deleted": "not found", "truncated": "not satisfiable", "cut inside": "truncated shard"}[damage]
    assert want in msg, msg


@pytest.mark.s3
def test_the_readers_s3_client_makes_one_attempt_so_every_retry_is_counted(s3, uneven_shards):
    """With storage options as a user writes them (endpoint, credentials), botocore would retry 5xx five times
    without telling anyone; the reader's client makes one attempt and leaves retries to the counted policy."""
    import s3fs

    from m3leo_stream.reader import ShardDataset
    from m3leo_stream.storage import single_attempt

    bucket = s3.new_bucket()
    fs = s3fs.S3FileSystem(endpoint_url=s3.url, key="testing", secret="testing")
    fs.put(str(uneven_shards), f"{bucket}/shards", recursive=True)
    from m3leo_stream.datamodule import M3LEODataModule

    user = {"endpoint_url": s3.url, "key": "testing", "secret": "testing"}
    dm = M3LEODataModule(f"s3://{bucket}/shards", inputs=["modisveg"], batch_size=2, num_workers=0,
                         storage_options=user)
    dm.setup()
    ds = dm._dataset(dm.catalog("train"))
    assert isinstance(ds, ShardDataset)
    client_fs = ds._state()["fs"]
    client_fs.connect()
    retries = client_fs.s3._client_config.retries
    assert retries["total_max_attempts"] == 1 and retries["mode"] == "standard"
    assert single_attempt("s3://b", {"config_kwargs": {"retries": {"max_attempts": 7}}})["config_kwargs"] == {
        "retries": {"max_attempts": 7}}  # the user's own setting is kept
    assert single_attempt("/local/root", {"a": 1}) == {"a": 1}


def test_botocore_does_not_retry_behind_our_back(monkeypatch):
    """Against a loopback endpoint that answers every request 503 SlowDown: the client of ``single_attempt``
    options sends one request per read, the same client without them several (botocore's silent retries)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import fsspec

    from m3leo_stream.storage import get_fs, single_attempt

    hits = []

    class SlowDown(BaseHTTPRequestHandler):
        def _answer(self):
            hits.append(self.command)
            body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), SlowDown)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    user = {"endpoint_url": f"http://127.0.0.1:{srv.server_port}", "key": "k", "secret": "s",
            "skip_instance_cache": True}
    try:
        counts = []
        for opts in (single_attempt("s3://b/x", user), user):
            fsspec.AbstractFileSystem.clear_instance_cache()
            fs, _ = get_fs("s3://b/x", opts)
            fs.retries = 1  # as the reader sets s3fs's own loop
            hits.clear()
            with pytest.raises(Exception) as err:
                fs.cat_file("b/x", start=0, end=10)
            assert is_transient(err.value)
            counts.append(len(hits))
        assert counts[0] == 1 and counts[1] > 1, counts
    finally:
        srv.shutdown()


def test_connection_pool_covers_requests_in_flight():
    """An S3 client gets a connection for every request in flight (botocore's 10 would queue the rest), unless the
    options size the pool; other protocols are left alone."""
    from m3leo_stream.storage import connection_pool

    assert connection_pool("s3://b/p", {}, 32)["config_kwargs"]["max_pool_connections"] == 32
    assert connection_pool("s3://b/p", {}, 4)["config_kwargs"]["max_pool_connections"] == 10
    own = {"config_kwargs": {"max_pool_connections": 5, "retries": {"total_max_attempts": 1}}}
    assert connection_pool("s3://b/p", own, 32)["config_kwargs"] == own["config_kwargs"]
    assert connection_pool("/data/shards", {}, 32) == {}
