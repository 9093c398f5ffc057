"""Shared fixtures: generated M3LEO-layout data, built shards, a real S3 endpoint (moto_server) on 127.0.0.1,
and the real rasters of ``../shared/data/real`` when present."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_service(what: str, reason: str) -> None:
    """Fail under CI=true (CI must provide the service), skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but unavailable: {reason}")
    pytest.skip(f"{what} unavailable: {reason}")


def real_data_dir() -> Path | None:
    env = os.environ.get("M3LEO_REAL_DATA")
    for p in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "real"]:
        if p.is_dir():
            return p
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    p = real_data_dir()
    if p is None:
        pytest.skip("real rasters not found: set M3LEO_REAL_DATA or provide ../shared/data/real next to the repo")
    return p


@pytest.fixture(scope="session")
def synth_src(tmp_path_factory) -> Path:
    """Two regions × 10 chips of every modality in the hub file layout."""
    from shard_tools.synth import SynthConfig, synth

    out = tmp_path_factory.mktemp("synth") / "src"
    synth(SynthConfig(str(out), ("conus", "europe"), 10, seed=7), workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, synth_src) -> Path:
    """Shards of ``synth_src`` with several shards per region/split."""
    from shard_tools.build import BuildConfig, build

    out = tmp_path_factory.mktemp("shards") / "root"
    build(BuildConfig(str(synth_src), str(out), shard_size=40_000_000, workers=1, progress=False))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    """A moto_server process on 127.0.0.1 and the environment that points s3fs at it."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        if not os.path.exists(exe):
            need_service("moto_server", "the moto[server] package is not installed")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    need_service("moto_server", f"exited with {self.proc.returncode}")
                time.sleep(0.1)
        else:
            self.proc.kill()
            need_service("moto_server", "did not start listening within 30 s")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        }

    def new_bucket(self) -> str:
        import boto3

        name = f"m3leo-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def s3_server():
    srv = S3Endpoint()
    yield srv
    srv.stop()


@pytest.fixture()
def s3(s3_server, monkeypatch):
    """The S3 endpoint with AWS_* variables set for this test; clears fsspec's cached clients."""
    import fsspec

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    fsspec.AbstractFileSystem.clear_instance_cache()
    yield s3_server
    fsspec.AbstractFileSystem.clear_instance_cache()
