"""Where the CLI finds the repository, its storage options and the password (flags, then env, then defaults).

Passwords come from an env var, a file, a Prefect Secret block or a prompt: never from a flag's value.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaultflow.storage.errors import VaultflowError


def vaultflow_home() -> Path:
    return Path(os.environ.get("VAULTFLOW_HOME") or Path.home() / ".vaultflow")


def default_repository() -> str:
    """The embedded default: a local repository under VAULTFLOW_HOME."""
    return str(vaultflow_home() / "repo")


@dataclass(frozen=True)
class RepoSettings:
    url: str
    storage_options: dict[str, Any]
    password_file: str | None
    password_secret: str | None

    def password(self, *, confirm: bool = False) -> str:
        return read_password(self.password_file, self.password_secret, confirm=confirm)


def storage_options_from_env() -> dict[str, Any]:
    return _json_object("VAULTFLOW_STORAGE_OPTIONS")


def _json_object(var: str) -> dict[str, Any]:
    raw = os.environ.get(var, "")
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise VaultflowError(f"{var} is not valid JSON ({e})") from None
    if not isinstance(opts, dict):
        raise VaultflowError(f"{var} must be a JSON object, e.g. {{\"anon\": false}}")
    return opts


def source_storage_options() -> dict[str, Any]:
    """fsspec options for a source given as a URL (VAULTFLOW_SOURCE_STORAGE_OPTIONS, JSON); the repository's
    own options are separate, since the two may live on different stores."""
    return _json_object("VAULTFLOW_SOURCE_STORAGE_OPTIONS")


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without `user:secret@`, those credentials as fsspec storage options).

    A URL travels into flow parameters, logs and records; credentials must not, so they move into storage
    options (`key`/`secret` for s3, `username`/`password` elsewhere) before anything sees the URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, {}
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url, {}
    from urllib.parse import unquote

    user, _, secret = userinfo.partition(":")
    names = ("key", "secret") if scheme in ("s3", "s3a") else ("username", "password")
    opts = {k: unquote(v) for k, v in zip(names, (user, secret), strict=True) if v}
    return f"{scheme}://{host}{slash}{path}", opts


def redact(url: str) -> str:
    """The URL as it may be shown: credentials replaced by `***`."""
    clean, opts = split_credentials(url)
    if not opts:
        return url
    scheme, _, rest = clean.partition("://")
    return f"{scheme}://***@{rest}"


def resolve(repo: str | None, password_file: str | None, password_secret: str | None) -> RepoSettings:
    """Settings from flags, then the environment. Credentials inside the URL move into the storage options and
    into VAULTFLOW_STORAGE_OPTIONS of this process (so tasks that resolve again find them), never into the URL
    that flow parameters and logs carry."""
    url, creds = split_credentials(repo or os.environ.get("VAULTFLOW_REPOSITORY") or default_repository())
    options = storage_options_from_env()
    if creds:
        options = {**options, **creds}
        os.environ["VAULTFLOW_STORAGE_OPTIONS"] = json.dumps(options)
    return RepoSettings(
        url=url,
        storage_options=options,
        password_file=password_file or os.environ.get("VAULTFLOW_PASSWORD_FILE"),
        password_secret=password_secret or os.environ.get("VAULTFLOW_PASSWORD_SECRET"),
    )


def read_password(password_file: str | None, secret_block: str | None, *, confirm: bool = False,
                  interactive: bool = True) -> str:
    """The repository password, from the first source that is set (a worker process never prompts)."""
    if password_file:
        try:
            pw = Path(password_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise VaultflowError(f"cannot read the password file {password_file}: {e.strerror}") from None
    elif os.environ.get("VAULTFLOW_PASSWORD"):
        pw = os.environ["VAULTFLOW_PASSWORD"]
    elif secret_block:
        from prefect.blocks.system import Secret  # only this path pays for importing Prefect

        pw = str(Secret.load(secret_block).get())
    elif interactive and sys.stdin.isatty():
        pw = getpass.getpass("repository password: ")
        if confirm and getpass.getpass("repeat password: ") != pw:
            raise VaultflowError("the passwords did not match")
    else:
        raise VaultflowError("no password: set VAULTFLOW_PASSWORD, VAULTFLOW_PASSWORD_FILE (or --password-file), "
                             "or VAULTFLOW_PASSWORD_SECRET naming a Prefect Secret block"
                             + ("" if interactive else " (in this worker's environment)"))
    if not pw:
        raise VaultflowError("the password is empty")
    return pw
