"""Shared fixtures: a real S3 server (moto's server mode on 127.0.0.1) and repositories on both backends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vaultflow.storage.keys import KdfParams

# Cheap KDF parameters keep the suite fast; one test exercises the real defaults.
FAST_KDF = KdfParams(time_cost=1, memory_kib=1024, parallelism=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _private_vaultflow_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's witnesses and defaults live in a folder of its own, never in the real ~/.vaultflow."""
    monkeypatch.setenv("VAULTFLOW_HOME", str(tmp_path_factory.mktemp("vaultflow-home")))
    # Each test's home gets its own CLI agent (cli/agent.py): let it go soon after the test's last command.
    monkeypatch.setenv("VAULTFLOW_AGENT_IDLE", "10")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}

    def new_bucket(self) -> str:
        import s3fs

        name = f"vf-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.storage_options).mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto S3 server process for the whole session, as s3fs's own test suite runs it."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto S3 server did not start on {endpoint}:\n{log.read_text()[-2000:]}") \
                    from None
            time.sleep(0.1)
    try:
        yield S3Server(endpoint, env)
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass(frozen=True)
class RepoLocation:
    """Where a test's repository lives: a URL plus fsspec storage options."""

    kind: str
    url: str
    storage_options: dict[str, Any]


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> RepoLocation:
    """The same test on a local directory and on S3 (moto server through s3fs)."""
    if request.param == "local":
        return RepoLocation("local", str(tmp_path / "repo"), {})
    server: S3Server = request.getfixturevalue("s3_server")
    return RepoLocation("s3", f"s3://{server.new_bucket()}/repo", server.storage_options)
from prefect_fixtures import prefect_server  # noqa: E402,F401  (a real Prefect server per session)
