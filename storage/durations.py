"""One grammar for durations on the command line and in config files: `26h`, `1d12h`, `90m`, `1w`, `30s`, `45`.

(`forget --keep-within` keeps restic's own grammar, `1y2m3d4h`, where `m` is months: storage/retention.py.)
"""

from __future__ import annotations

import re

from .errors import VaultflowError

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


class DurationError(VaultflowError, ValueError):
    """Not a duration (a ValueError too, so pydantic validators report it against the key)."""


def parse_duration(text: str) -> float:
    """Seconds of `26h`, `3d`, `1d12h`, `90m`, `1w`, `30s`, or a plain number of seconds."""
    spec = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        return float(spec)
    parts = re.findall(r"(\d+(?:\.\d+)?)([wdhms])", spec)
    if not parts or "".join(n + u for n, u in parts) != spec:
        raise DurationError(f"duration {text!r}: use numbers with w, d, h, m or s (e.g. 26h or 1d12h)")
    return sum(float(n) * _UNITS[u] for n, u in parts)
