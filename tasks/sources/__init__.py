"""Sources: one module per kind of source, each a `Source` subclass (see base.py for the protocol).

Every module in this package is imported on first lookup, and packages may add sources through the
`vaultflow.sources` entry point group: adding a source touches no existing file.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from vaultflow.storage.errors import SourceError

from .base import Source, SourceSpec

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    for ep in entry_points(group="vaultflow.sources"):
        ep.load()
    _loaded = True


def kinds() -> dict[str, type[Source]]:
    _load_all()
    return dict(Source.registry)


def kind(name: str) -> type[Source]:
    found = kinds().get(name)
    if found is None:
        raise SourceError(f"no source of kind {name!r}; known: {', '.join(sorted(kinds()))}")
    return found


def for_paths(paths: list[str]) -> Source:
    """The source that reads `paths` (one URL, or local paths): chosen by URL scheme, then priority."""
    if not paths:
        raise SourceError("nothing to back up: name a path or a URL")
    matching = [cls for cls in kinds().values() if cls.matches(paths[0])]
    if not matching:
        scheme = paths[0].split("://", 1)[0] if "://" in paths[0] else paths[0].split(":", 1)[0]
        raise SourceError(f"no source reads {scheme}:// URLs; known kinds: {', '.join(sorted(kinds()))}")
    cls = max(matching, key=lambda c: c.priority)
    if len(paths) > 1 and cls.kind != "filesystem":
        raise SourceError(f"a {cls.kind} source is backed up on its own: give one URL per backup")
    return cls(paths)


def reader(spec: SourceSpec):  # type: ignore[no-untyped-def]
    return kind(spec.kind).reader(spec)


__all__ = ["Source", "SourceSpec", "for_paths", "kind", "kinds", "reader"]
