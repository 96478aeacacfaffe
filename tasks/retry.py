"""Retry policy shared by tasks that touch storage: retry what may pass, never what will not.

A wrong password, a damaged object or a hostile path fails the same way every time; a network error may not.
"""

from __future__ import annotations

from typing import Any

from vaultflow.storage.errors import VaultflowError


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the failure is one of vaultflow's own deliberate errors."""
    try:
        state.result()
    except VaultflowError:
        return False
    except Exception:  # noqa: BLE001 - anything else (I/O, network, timeouts) may succeed on a retry
        return True
    return True


RETRY = {"retries": 2, "retry_delay_seconds": [1, 5], "retry_condition_fn": transient_only}
