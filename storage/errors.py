"""The error hierarchy of vaultflow's repository layer.

Every message names the object, what was expected, what was found, and the next step for the user.
"""

from __future__ import annotations

import time


class VaultflowError(Exception):
    """Base of every error vaultflow raises on purpose."""


class IntegrityError(VaultflowError):
    """An object failed authentication or a structural check: it was modified, truncated or corrupted."""

    def __init__(self, obj: str, problem: str, hint: str = "run `vaultflow check` to see what is affected") -> None:
        self.obj = obj
        self.problem = problem
        super().__init__(f"{obj}: {problem}; {hint}")


class WrongPassword(VaultflowError):
    """No key file in the repository opens with the given password."""


class NotARepository(VaultflowError):
    """The location holds no vaultflow repository (or one of an unknown version)."""


class RepositoryExists(VaultflowError):
    """`init` was asked to create a repository where one already exists."""


class ObjectExists(VaultflowError):
    """A write would have replaced an existing object; objects are immutable."""


class ObjectMissing(VaultflowError):
    """An object that the repository refers to is not in storage."""


class RepositoryLocked(VaultflowError):
    """Another process holds a lock that conflicts with the one requested."""


class LockLost(RepositoryLocked):
    """A holder found that its lock was taken from it (judged stale by another process); it must not commit."""


class SourceError(VaultflowError):
    """A source could not be read."""


class ObjectLockError(VaultflowError):
    """Object Lock was asked for where the store cannot provide it."""


class ObjectLocked(VaultflowError):
    """The store refused to delete an object still under Object Lock retention: pending, not an error."""

    def __init__(self, name: str, until: float | None) -> None:
        self.name, self.until = name, until
        when = "" if until is None else " until " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(until))
        super().__init__(f"{name}: retained by Object Lock{when}; deleted once retention has released it")
