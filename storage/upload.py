"""A write session: threads pack new blobs, upload full packs, and record them for the next index file.

Resumes after a crash by adopting packs that are in storage but in no index file (found from their trailers).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .crypto import content_hash
from .index import encode_index_file
from .lock import STALE_AFTER
from .maintenance import deletion_candidates
from .pack import FOOTER_SIZE, HEADER_SIZE, PackEntry, PackReader, PackWriter

if TYPE_CHECKING:
    from .repository import Repository

_TAIL = 64 << 10  # bytes read from a pack's end to find its trailer in one request (≈1400 entries)


@dataclass
class SessionStats:
    blobs_new: int = 0
    bytes_new_raw: int = 0  # plaintext bytes of new blobs
    bytes_new_stored: int = 0  # after compression and encryption
    packs_uploaded: int = 0
    bytes_uploaded: int = 0


class WriteSession:
    """One per backup batch (or per flow, for adopting leftovers); `Packer`s from `packer()` do the work, one per
    thread. Sessions of one run may run in different processes or machines: each writes its own packs and
    index files, and two may store the same blob (harmless: the index keeps one, prune drops the other)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.stats = SessionStats()
        self.index_files: list[str] = []
        self.blob_ids: list[bytes] = []  # every blob this session stored, in upload order
        self._lock = threading.Lock()
        self._reserved: set[bytes] = set()
        self._unindexed: dict[str, list[PackEntry]] = {}  # uploaded or adopted, not yet in an index file
        self._index_every = 256  # packs between index files, so a crash loses little indexing work
        self._packers: dict[int, Packer] = {}
        # Full packs are verified and written by one background thread, so the threads that chunk and
        # compress do not wait on the disk or the network; two packs may wait, which bounds memory.
        self._queue: queue.Queue[PackWriter | None] = queue.Queue(maxsize=2)
        self._uploader: threading.Thread | None = None
        self._failed: list[tuple[PackWriter, BaseException]] = []
        self.missing_packs: list[str] = []  # packs the index names but storage no longer has

    def adopt_orphan_packs(self) -> int:
        """One listing of data/ at session start. Packs left by an interrupted run (in storage, in no index file)
        are indexed from their trailers instead of being uploaded again; packs the index names but storage has
        lost are forgotten (`missing_packs`), so their chunks count as absent and this backup stores them again
        rather than committing references to lost data."""
        listed = dict(self.repo.backend.list("data"))
        self.missing_packs = self.repo.forget_lost_packs(set(listed))
        for name, age in self.repo.backend.temporaries("data"):
            if age > STALE_AFTER:  # a writer that old is dead: packs are written in seconds
                self.repo.backend.delete(name)
        # A prune's deletion candidates are in no index file on purpose: they are not leftovers to adopt.
        orphans = trailers(self.repo, listed, self.repo.index.pack_set() | set(deletion_candidates(self.repo)))
        for name, entries in orphans.items():
            self.repo.index.add(name, entries)
        with self._lock:
            # Packs whose only index file is damaged were indexed from their trailers when the index loaded;
            # this session's index file lists them again, so the damage stops costing every later reader.
            self._unindexed.update(self.repo.recovered_packs)
            self._unindexed.update(orphans)
        return len(orphans)

    def claim(self, blob_ids: list[bytes]) -> list[bool]:
        """For each id, whether the caller must store it: not in the index and not claimed by another thread."""
        present = self.repo.index.contains_many(blob_ids)
        out = []
        with self._lock:
            for bid, have in zip(blob_ids, present, strict=True):
                mine = not have and bid not in self._reserved
                if mine:
                    self._reserved.add(bid)
                out.append(mine)
        return out

    def packer(self) -> Packer:
        """This thread's packer: batches that run on one thread fill the same packs."""
        ident = threading.get_ident()
        with self._lock:
            p = self._packers.get(ident)
            if p is None:
                p = self._packers[ident] = Packer(self)
            return p

    def flush(self) -> None:
        """Upload every thread's partial pack and wait for all uploads (call when no batch is running)."""
        with self._lock:
            packers = list(self._packers.values())
        for p in packers:
            p.flush()
        self.drain()

    def submit(self, writer: PackWriter) -> None:
        """Hand a full pack to the background uploader (blocks while two packs already wait)."""
        with self._lock:
            if self._uploader is None:
                self._uploader = threading.Thread(target=self._upload_loop, name="vaultflow-upload", daemon=True)
                self._uploader.start()
        self._queue.put(writer)

    def _upload_loop(self) -> None:
        while (writer := self._queue.get()) is not None:
            try:
                self.upload(writer)
            except BaseException as e:  # noqa: BLE001 - kept for drain(), which retries and reports it
                with self._lock:
                    self._failed.append((writer, e))
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def drain(self) -> None:
        """Wait for every submitted pack; uploads that failed are tried once more here and raise if they fail
        again (the caller is a Prefect task with retries, so retrying stays the orchestrator's job)."""
        self._queue.join()
        with self._lock:
            failed, self._failed = self._failed, []
        for i, (writer, _) in enumerate(failed):
            try:
                self.upload(writer)
            except BaseException:
                with self._lock:
                    self._failed.extend(failed[i:])
                raise

    def close(self) -> None:
        """Stop the uploader thread (after drain)."""
        if self._uploader is not None:
            self._queue.put(None)
            self._uploader.join()
            self._uploader = None

    def upload(self, writer: PackWriter) -> str:
        """Verify, write and index one pack now, in the calling thread."""
        data = writer.finish()
        digest = content_hash(data)
        name = f"data/{digest[:2]}/{digest}"
        self.repo.backend.write(name, data, content_named=True)
        self.repo.index.add(name, writer.entries)
        write_index = False
        with self._lock:
            self._unindexed[name] = writer.entries
            self._reserved.difference_update(e.id for e in writer.entries)
            self.stats.packs_uploaded += 1
            self.stats.bytes_uploaded += len(data)
            self.stats.blobs_new += len(writer.entries)
            self.blob_ids.extend(e.id for e in writer.entries)
            self.stats.bytes_new_raw += sum(e.raw_length for e in writer.entries)
            self.stats.bytes_new_stored += sum(e.length for e in writer.entries)
            write_index = len(self._unindexed) >= self._index_every
        if write_index:
            self.write_index()
        return name

    def write_index(self) -> list[str]:
        """Write one index file for every pack not yet in one; returns all index files this session wrote."""
        if threading.current_thread() is not self._uploader:
            self.drain()
        with self._lock:
            pending, self._unindexed = self._unindexed, {}
        if pending:
            data = encode_index_file(self.repo.master.index_key, pending)
            name = f"index/{content_hash(data)}"
            self.repo.backend.write(name, data, content_named=True)
            with self._lock:
                self.index_files.append(name)
        return list(self.index_files)


class Packer:
    """Packs one thread's new blobs; uploads each pack when it reaches the repository's pack size."""

    def __init__(self, session: WriteSession) -> None:
        self.session = session
        repo = session.repo
        self._size = repo.config.pack_size
        self._writer = self._new()

    def _new(self) -> PackWriter:
        repo = self.session.repo
        return PackWriter(repo.master.blob_key, repo.master.chunk_id_key, repo.config.compression_level)

    def add(self, blob_id: bytes, blob_type: int, data: bytes | memoryview) -> int:
        stored = self._writer.add(blob_id, blob_type, data)
        if self._writer.size >= self._size:
            self.flush()
        return stored

    def flush(self) -> None:
        if len(self._writer):
            self.session.submit(self._writer)
            self._writer = self._new()



def trailers(repo: Repository, listed: dict[str, int], known: set[str]) -> dict[str, list[PackEntry]]:
    """The entries of every listed pack not in `known`, read from its trailer; a damaged pack is left out (check
    and prune report it)."""
    found = {}
    for name, size in listed.items():
        if name in known:
            continue
        try:
            found[name] = read_pack_trailer(repo, name, size)
        except Exception:  # noqa: BLE001 - whatever is wrong with one pack, the others are still indexed
            continue
    return found


def read_pack_trailer(repo: Repository, name: str, size: int) -> list[PackEntry]:
    """The entries of a pack from its header and trailer, in one ranged request when the trailer is small."""
    tail_start = max(HEADER_SIZE, size - _TAIL)
    header, tail = repo.backend.read_ranges(name, [(0, HEADER_SIZE), (tail_start, size)])
    reader = PackReader(repo.master.blob_key, header, name)
    if len(tail) >= FOOTER_SIZE and PackReader.trailer_span(tail) > len(tail) and tail_start > HEADER_SIZE:
        tail = repo.backend.read_range(name, max(HEADER_SIZE, size - PackReader.trailer_span(tail)), size)
    return reader.trailer(tail, size)
