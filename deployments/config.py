"""The `vaultflow serve` config: one repository, its sources and their schedules, verification, restore tests,
retention, audit, and who hears about failures. One small TOML file (deployments/example.toml documents every key).

Secrets never live in it: passwords and webhook tokens come from the environment or Prefect Secret blocks; a key
that looks like one (`password = …`, `token = …`, credentials in a URL) is refused, naming the way to do it. No
Prefect import: `vaultflow serve` reads it before it starts or imports Prefect, so a typo costs nothing.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vaultflow.storage.durations import parse_duration
from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks.settings import split_credentials

_SECRET_KEYS = {"password", "passwd", "token", "secret", "api_key", "apikey"}
_PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}")  # `token = "{{token}}"` in a payload names a secret, holds none


def seconds(text: str) -> float:
    """Seconds of a duration in the one grammar every vaultflow duration uses (storage/durations.py)."""
    return parse_duration(text)


def _at_least_10s(text: str) -> str:
    if seconds(text) < 10:
        raise ValueError(f"{text!r}: at least 10s (Prefect's shortest schedule interval and proactive window)")
    return text


def _matching(pattern: str, rule: str) -> AfterValidator:
    def check(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise ValueError(f"{text!r}: use {rule}")
        return text

    return AfterValidator(check)


def _checked_by(module: str, function: str) -> AfterValidator:
    """The check the CLI makes of the same value (vaultflow's own parser), so a typo fails now, not at 5 am."""
    def check(text: str) -> str:
        try:
            if text:
                getattr(importlib.import_module(module), function)(text)
        except VaultflowError as e:
            raise ValueError(str(e)) from None
        return text

    return AfterValidator(check)


Duration = Annotated[str, AfterValidator(_at_least_10s)]  # `26h`, `1d12h`, `90m`: at least 10 seconds
Label = Annotated[str, _matching(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "letters, digits, '.', '_' and '-' (up to 64)")]
BlockName = Annotated[str, _matching(r"[a-z0-9][a-z0-9-]{0,47}", "lowercase letters, digits and '-' (up to 48)")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scheduled(Strict):
    """When a deployment runs: a `cron` line (with an IANA `timezone`) or an interval (`every = "6h"`)."""

    cron: str | None = None
    every: Duration | None = None
    timezone: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Scheduled:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of cron = \"0 2 * * *\" or every = \"6h\"")
        return self

    def interval(self) -> timedelta | None:
        return None if self.every is None else timedelta(seconds=seconds(self.every))


class Repository(Strict):
    url: str  # a path or fsspec URL; storage credentials come from VAULTFLOW_STORAGE_OPTIONS or the store's own env
    name: Label | None = None  # in deployment names and tags; default: the repository id
    password_secret: str | None = None  # a Prefect Secret block; else VAULTFLOW_PASSWORD(_FILE) of `serve`
    password_file: str | None = None  # a file holding the password (the path, never the password)

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        if split_credentials(url)[1]:
            raise ValueError("the repository URL holds credentials: put them in VAULTFLOW_STORAGE_OPTIONS or the "
                             "store's own environment (AWS_ACCESS_KEY_ID, …), never in the config file")
        return url


class Source(Scheduled):
    name: Annotated[str, _checked_by("vaultflow.storage.manifest", "check_source_name")]
    paths: list[str] = Field(min_length=1)  # local paths, or one source URL (s3://…, postgresql://…, command:…)
    rpo: Duration = "26h"  # the longest a source may go without a committed backup before someone is told
    exclude: list[str] = []
    error_budget: int = 100
    lock_wait: float = 900.0  # seconds a scheduled backup waits behind a prune or another backup of the source
    task_runner: str = "auto"

    @field_validator("paths")
    @classmethod
    def _no_passwords(cls, paths: list[str]) -> list[str]:
        for shown, creds in map(split_credentials, paths):
            if creds.get("password") or creds.get("secret"):
                raise ValueError(f"source path {shown!r} holds a password: pass it in serve's environment "
                                 "(PGPASSWORD, VAULTFLOW_SOURCE_STORAGE_OPTIONS, …)")
        return paths


class Verify(Strict):
    """`check --read-data-subset K/N` every `every`, K advancing by one each period: N runs read every pack."""

    every: Duration = "1d"
    subsets: int = Field(default=7, ge=1, le=366)  # N
    anchor: datetime = datetime(2024, 1, 1, 3, 0, tzinfo=UTC)  # when slice 1/N runs; slice K runs K-1 periods later
    task_runner: str = "auto"

    def subset_schedules(self) -> list[tuple[str, datetime, timedelta]]:
        """(K/N, first run, period) per slice. The K of a run is the number of periods since `anchor`, modulo N,
        plus one: the clock decides it, so it survives restarts, a new Prefect database and missed runs (a missed
        slice is read in the next cycle). Each slice is its own interval schedule every N periods."""
        step = timedelta(seconds=seconds(self.every))
        return [(f"{k}/{self.subsets}", self.anchor + (k - 1) * step, step * self.subsets)
                for k in range(1, self.subsets + 1)]


class RestoreTest(Scheduled):
    sample: int = Field(default=20, ge=1)
    everything: bool = False
    task_runner: str = "auto"


class Retention(Scheduled):
    """`forget` by policy, then `prune`; one retention run at a time per repository (a global concurrency limit)."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: Annotated[str, _checked_by("vaultflow.storage.retention", "within_delta")] = ""
    keep_tags: list[str] = []
    prune: bool = True
    max_unused: Annotated[str, _checked_by("vaultflow.storage.prune_plan", "parse_max_unused")] = "5%"
    grace: Annotated[str, _checked_by("vaultflow.storage.durations", "parse_duration")] = "24h"
    lock_wait: float = 3600.0  # seconds prune waits for backups and checks to let go of the repository

    @model_validator(mode="after")
    def _some_rule(self) -> Retention:
        if not any(self.policy().values()):
            raise ValueError("no keep rule: name at least one keep_… rule (keep_daily = 7, …)")
        return self

    def policy(self) -> dict[str, Any]:
        return self.model_dump(include={"keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
                                        "keep_yearly", "keep_within", "keep_tags"})


class Audit(Scheduled):
    verified_within: float = 30.0  # days


class Webhook(Strict):
    """One target: `{{subject}}`, `{{body}}` in `payload` are the message, `{{token}}` (url, headers, payload) the
    secret of `token_env`/`token_secret`. Slack, Teams, PagerDuty, mail APIs (SendGrid, …) are all URL + payload."""

    name: BlockName  # its notification block is vaultflow-<name>
    url: str
    payload: dict[str, Any] = {"subject": "{{subject}}", "body": "{{body}}"}
    headers: dict[str, str] = {}
    token_env: str | None = None  # an environment variable of `serve` holding the token
    token_secret: str | None = None  # or a Prefect Secret block holding it


class Notify(Strict):
    webhooks: list[Webhook] = []
    ui_url: str | None = None  # base of run links; default PREFECT_UI_URL, else the API URL without /api


class Config(Strict):
    repository: Repository
    sources: list[Source] = Field(min_length=1)
    verify: Verify | None = None
    restore_test: RestoreTest | None = None
    retention: Retention | None = None
    audit: Audit | None = None
    notify: Notify = Notify()

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        return self


def _refuse_secrets(data: Any, where: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if key.lower() in _SECRET_KEYS and not (isinstance(value, str) and _PLACEHOLDER.fullmatch(value)):
                raise VaultflowError(f"{where}{key}: secrets never go in the config file; name an environment "
                                     "variable or a Prefect Secret block (password_secret, token_env, token_secret)")
            _refuse_secrets(value, f"{where}{key}.")
    elif isinstance(data, list):
        for i, item in enumerate(data):
            _refuse_secrets(item, f"{where}{i}.")


def parse(text: str, origin: str = "config") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise VaultflowError(f"{origin}: not valid TOML ({e})") from None
    _refuse_secrets(data, f"{origin}: ")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(str(p) for p in first["loc"]) or "(top)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise VaultflowError(f"{origin}: {at}: {first['msg'].removeprefix('Value error, ')}{more}") from None


def load(path: str | Path) -> Config:
    """The config at `path`, validated; every problem is one line naming the key."""
    p = Path(path).expanduser()
    try:
        return parse(p.read_text(), str(p))
    except OSError as e:
        raise VaultflowError(f"cannot read the serve config {p}: {e.strerror}; see deployments/example.toml") \
            from None
