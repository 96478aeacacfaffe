"""The worked example of docs/sources.md: exports from an HTTP API (a real http.server on 127.0.0.1) are backed up
as a tree, unchanged exports are not downloaded again, a new ETag is, and the snapshot gives the bytes back."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest
from backup_helpers import read_back
from conftest import FAST_KDF

from vaultflow.storage.errors import SourceError
from vaultflow.storage.repository import Repository
from vaultflow.tasks.sources import for_paths

TOKEN = "t0ken-for-tests"
LONG_AGO = 1_700_000_000  # exports older than the racy window: their metadata alone proves them unchanged


class ExportsAPI(ThreadingHTTPServer):
    """Serves /exports/index.json and /exports/<name> from `exports` (name → (bytes, etag)), to a bearer token."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.exports: dict[str, tuple[bytes, str]] = {}
        self.downloads: Counter[str] = Counter()
        self.extra_index: list[dict[str, object]] = []

    @property
    def url(self) -> str:
        return f"http-exports+http://127.0.0.1:{self.server_address[1]}/exports/"


class Handler(BaseHTTPRequestHandler):
    server: ExportsAPI

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.send_error(401)
        name = unquote(self.path.removeprefix("/exports/"))
        if name == "index.json":
            data, headers = json.dumps([{"name": n, "size": len(d), "etag": e, "mtime": LONG_AGO}
                                        for n, (d, e) in self.server.exports.items()]
                                       + self.server.extra_index).encode(), {}
        elif name in self.server.exports:
            data, etag = self.server.exports[name]
            headers = {"ETag": f'"{etag}"', "Last-Modified": formatdate(LONG_AGO, usegmt=True)}
            if body:
                self.server.downloads[name] += 1
        else:
            return self.send_error(404)
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def exports_api() -> Iterator[ExportsAPI]:
    server = ExportsAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_exports_are_backed_up_as_a_tree_and_only_changed_ones_downloaded_again(exports_api, prefect_server,
                                                                                monkeypatch, tmp_path):
    from vaultflow.flows.backup import backup
    from vaultflow.flows.runtime import run_flow

    monkeypatch.setenv("VAULTFLOW_PASSWORD", "pw")
    monkeypatch.setenv("VAULTFLOW_SOURCE_PASSWORD", TOKEN)
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf=FAST_KDF)
    exports_api.exports = {"2026-11-01.csv": (b"id,amount\n" + b"1,20\n" * 50_000, "v1"),
                           "2026-11-02 late.csv": (b"id,amount\n3,40\n", "v1"), "empty.json": (b"", "v1")}
    exports_api.extra_index = [{"name": "../escape.csv", "size": 1, "etag": "x"}]

    first = run_flow(backup, paths=[exports_api.url], repository=repo.url)
    assert (first.files, first.files_new, first.errors) == (3, 3, 1)  # the name with a slash is listed as an error
    assert read_back(repo) == {n.encode(): d for n, (d, _) in exports_api.exports.items()}

    second = run_flow(backup, paths=[exports_api.url], repository=repo.url)
    assert (second.files_unchanged, second.bytes_read) == (3, 0)
    assert exports_api.downloads == Counter({n: 1 for n in exports_api.exports})

    changed = b"id,amount\n3,41\n"
    exports_api.exports["2026-11-02 late.csv"] = (changed, "v2")  # same size, same mtime, a new ETag
    third = run_flow(backup, paths=[exports_api.url], repository=repo.url)
    assert (third.files_changed, third.files_unchanged, third.bytes_read) == (1, 2, len(changed))
    assert exports_api.downloads["2026-11-02 late.csv"] == 2 and exports_api.downloads["2026-11-01.csv"] == 1
    assert read_back(Repository.open(repo.url, "pw"))[b"2026-11-02 late.csv"] == changed


def test_check_refuses_an_index_it_cannot_read_in_one_line(exports_api, monkeypatch):
    monkeypatch.setenv("VAULTFLOW_SOURCE_PASSWORD", "wrong-token")
    with pytest.raises(SourceError, match="cannot read the index of http-exports") as e:
        for_paths([exports_api.url]).check()
    assert "401" in str(e.value) and "\n" not in str(e.value) and "wrong-token" not in str(e.value)
    monkeypatch.setenv("VAULTFLOW_SOURCE_PASSWORD", TOKEN)
    for_paths([exports_api.url]).check()
