"""Progress of a running backup: a Prefect progress artifact, and an optional in-process listener (the CLI bar).

Tasks call `advance`; the listener is a plain callable so no bytes or objects travel through Prefect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Run

Listener = Callable[[int, int, int, int], None]  # (bytes done, bytes total, files done, files total)


@dataclass
class _Progress:
    bytes_total: int
    files_total: int
    bytes_done: int = 0
    files_done: int = 0
    artifact_id: object | None = None
    artifact_at: float = 0.0  # monotonic time of the last artifact update


ARTIFACT_EVERY = 1.0
_lock = threading.Lock()
_runs: dict[str, _Progress] = {}
_listener: list[Listener] = []


def set_listener(listener: Listener | None) -> None:
    """Install (or remove) the process's progress listener, e.g. the CLI's rich progress bar."""
    with _lock:
        _listener.clear()
        if listener is not None:
            _listener.append(listener)


def start(run: Run, bytes_total: int, files_total: int, key: str = "backup-progress",
          description: str = "bytes read of the files that changed") -> None:
    from prefect.artifacts import create_progress_artifact

    artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    with _lock:
        _runs[run.session] = _Progress(bytes_total, files_total, artifact_id=artifact_id)
    _notify(run)


def advance(run: Run, nbytes: int, nfiles: int) -> None:
    """Count work done; the artifact is updated at most every ARTIFACT_EVERY seconds (each is an API call)."""
    with _lock:
        p = _runs.get(run.session)
        if p is None:
            return
        p.bytes_done += nbytes
        p.files_done += nfiles
        now = time.monotonic()
        update = p.artifact_id is not None and (now - p.artifact_at >= ARTIFACT_EVERY or _percent(p) >= 100.0)
        if update:
            p.artifact_at = now
    _notify(run)
    if update:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(artifact_id=p.artifact_id, progress=_percent(p))  # type: ignore[arg-type]


def finish(run: Run) -> None:
    with _lock:
        _runs.pop(run.session, None)


def _percent(p: _Progress) -> float:
    if p.bytes_total:
        return min(100.0, 100.0 * p.bytes_done / p.bytes_total)
    return 100.0 if p.files_done >= p.files_total else 100.0 * p.files_done / max(p.files_total, 1)


def _notify(run: Run) -> None:
    with _lock:
        p = _runs.get(run.session)
        listeners = list(_listener)
    if p is not None:
        for fn in listeners:
            fn(p.bytes_done, p.bytes_total, p.files_done, p.files_total)
