"""The restore target seen only through file descriptors: opened without following links, each directory and
file checked to be the very inode (st_dev, st_ino) that the restore created there (format.md §10).
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import VaultflowError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in for a file must not hang the open; it changes nothing for regular files
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
# what opening an entry the restore created fails with once someone replaced it (ELOOP/EMLINK: a symlink)
_GONE = frozenset({errno.ENOENT, errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.EISDIR, errno.ENXIO,
                   errno.EACCES, errno.EPERM})
_DIR_FD_CACHE = 256  # verified directory fds a cursor keeps open

Ident = tuple[int, int]  # (st_dev, st_ino)


def ident(st: os.stat_result) -> Ident:
    return st.st_dev, st.st_ino


class ChangedInTarget(VaultflowError):
    """An entry the restore created is no longer there (another inode, a symlink, gone): it is left alone."""

    def __init__(self, raw: bytes, detail: str | None = None) -> None:
        shown = raw.decode("utf-8", "backslashreplace") or "."
        super().__init__(f"{shown!r} changed in the target during the restore (swapped?); not written"
                         + (f" ({detail})" if detail else ""))


class DirectoryNotRestored(VaultflowError):
    """An entry below a directory that the restore could not create: nothing is attempted for it."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(f"not created: its directory {raw.decode('utf-8', 'backslashreplace')!r} was not restored")


def open_target(target: bytes, overwrite: bool) -> int:
    """An fd of the target folder (created if missing): a real directory, never a link to one, and empty unless
    `overwrite`. Only the last component is checked: the folders above it are the user's own choice."""
    shown = os.fsdecode(target)
    try:
        os.makedirs(target)
    except FileExistsError:
        pass
    except OSError as e:
        raise VaultflowError(f"{shown}: cannot create the restore folder ({e.strerror}); choose a folder whose "
                             "parent is a directory you can write to") from None
    st = os.lstat(target)
    if stat.S_ISLNK(st.st_mode):
        raise VaultflowError(f"{shown} is a symbolic link (to {os.fsdecode(os.readlink(target))}); restore does not "
                             "follow links: pass the folder it points to")
    if not stat.S_ISDIR(st.st_mode):
        raise VaultflowError(f"{shown} exists and is not a directory; restore into a new or empty folder")
    try:  # O_NOFOLLOW: a link swapped in since the lstat is refused as well
        fd = os.open(target, DIR_FLAGS)
    except OSError as e:
        raise VaultflowError(f"{shown}: cannot open the restore folder ({e.strerror}); it changed while restore "
                             "looked at it, or is not readable") from None
    if os.listdir(fd) and not overwrite:
        os.close(fd)
        raise VaultflowError(f"{shown} is not empty; restore into an empty folder or pass --overwrite to replace "
                             "files that exist there")
    return fd


def reopen_target(target: bytes, expected: Ident) -> int:
    """The target folder again, by its name, in a process that cannot share prepare's fd (a task runner's worker):
    the very directory prepare opened (`expected`), never a link or another folder put in its place since."""
    shown = os.fsdecode(target)
    try:
        fd = os.open(target, DIR_FLAGS)
    except OSError as e:
        raise ChangedInTarget(b"", f"the restore folder {shown}: {e.strerror}") from None
    if ident(os.fstat(fd)) != expected:
        os.close(fd)
        raise ChangedInTarget(b"", f"{shown} is no longer the folder the restore prepared (renamed or replaced?)")
    return fd


class Cursor:
    """The target's directories as fds for one phase on one thread (prepare, one restore_packs call, finish).

    Each directory is opened from its parent's fd without following links, and its st_dev/st_ino must be the
    ones recorded when prepare created it; verified fds are reused, since siblings come together. No path is
    resolved from the target's name again, so a directory swapped for a link is caught by the next phase that
    opens it, and an fd opened before the swap still points into the directory the restore created."""

    def __init__(self, root: int, ids: dict[bytes, Ident], failed: set[bytes], adopt: bool) -> None:
        self.root, self.ids, self.failed = root, ids, failed  # ids: what the restore made; failed: dirs it could not
        self.adopt = adopt  # record the identity of directories found on the way (prepare with overwrite)
        self.fds: dict[bytes, int] = {}

    def parent(self, raw: bytes) -> tuple[int, bytes]:
        """(borrowed fd of the entry's directory, the entry's name); fds from earlier calls may be closed."""
        self.trim()
        head, _, name = raw.rpartition(b"/")
        return self.dir(head), name

    def trim(self) -> None:
        """Bound the open fds; called where no fd handed out earlier is still in use."""
        if len(self.fds) >= _DIR_FD_CACHE:
            self.close()

    def dir(self, path: bytes) -> int:
        """A borrowed fd of the directory at `path` (b"" is the target); never closes fds it handed out."""
        if not path:
            return self.root
        fd = self.fds.get(path)
        if fd is not None:
            return fd
        parts = path.split(b"/")
        n = len(parts) - 1
        while n and b"/".join(parts[:n]) not in self.fds:  # the deepest ancestor already open
            n -= 1
        fd = self.fds[b"/".join(parts[:n])] if n else self.root
        for k in range(n, len(parts)):
            fd = self._open_dir(fd, parts[k], b"/".join(parts[:k + 1]))
        return fd

    def open_file(self, raw: bytes, flags: int) -> tuple[int, os.stat_result]:
        """An fd (the caller closes it) of the entry the restore created at `raw`, or ChangedInTarget."""
        parent, name = self.parent(raw)
        try:
            fd = os.open(name, flags | FILE_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in _GONE:
                raise ChangedInTarget(raw, e.strerror) from None
            raise
        st = os.fstat(fd)
        if ident(st) != self.ids.get(raw):
            os.close(fd)
            raise ChangedInTarget(raw)
        return fd, st

    def add(self, path: bytes, fd: int) -> None:
        """Keep a directory fd that the caller verified (prepare's own mkdir); the cursor closes it."""
        old = self.fds.pop(path, None)
        if old is not None:
            os.close(old)
        self.fds[path] = fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _open_dir(self, parent: int, name: bytes, path: bytes) -> int:
        if path in self.failed:
            raise DirectoryNotRestored(path)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if path in self.ids and e.errno in _GONE:
                raise ChangedInTarget(path, e.strerror) from None
            raise
        try:
            found = ident(os.fstat(fd))
            if path not in self.ids and self.adopt:
                self.ids[path] = found
            if self.ids.get(path) != found:
                raise ChangedInTarget(path)
        except BaseException:
            os.close(fd)
            raise
        self.add(path, fd)
        return fd
