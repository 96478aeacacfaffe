"""Alarms on the Prefect server for one served repository: a notification block per webhook, and automations for
a vaultflow run that ends Failed or Crashed, a source with no committed backup within its RPO (a dead man's switch
on tasks/witness.COMMITTED_EVENT), and a run whose heartbeat stopped (killed: marked Crashed, which then alarms).

Idempotent: `install` updates automations by name, creates missing ones and deletes this repository's stale ones.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.automations import EventTrigger, Posture
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import AutomationCore

from vaultflow.storage.errors import VaultflowError
from vaultflow.tasks.witness import COMMITTED_EVENT, resource_id

from .config import Config, Source, Webhook, seconds

# Every flow vaultflow runs, served or started from the CLI (which gives its runs no tags): matched by flow name.
FLOW_NAMES = ["backup", "check", "restore", "restore-database", "restore-test", "forget", "prune", "audit",
              "replicate", "retention"]
ZOMBIES = "vaultflow: runs whose heartbeat stopped"
TERMINAL = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed"}

# Rendered by the server (Jinja) for each Failed or Crashed event; `{{ flow_run|ui_url }}` renders None on a
# self-hosted server without PREFECT_UI_URL, so the link is built from the UI's base and the run id.
FAILED_SUBJECT = "vaultflow {{ flow.name }} {{ flow_run.state.name }}: {{ flow_run.name }}"
FAILED_BODY = """{{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}
source: {{ flow_run.parameters.source or flow_run.parameters.paths or flow_run.parameters.sources \
or "(whole repository)" }}
error: {{ flow_run.state.message }}
run: %s/runs/flow-run/{{ flow_run.id }}
tags: {{ flow_run.tags | join(", ") }}"""


def block_name(hook: Webhook) -> str:
    return f"vaultflow-{hook.name}"


def _token(hook: Webhook) -> str | None:
    if hook.token_env:
        value = os.environ.get(hook.token_env)
        if not value:
            raise VaultflowError(f"webhook {hook.name}: token_env {hook.token_env} is not set in serve's environment")
        return value
    if hook.token_secret:
        from prefect.blocks.system import Secret

        try:
            secret: Any = Secret.load(hook.token_secret)
            return str(secret.get())
        except ValueError:
            raise VaultflowError(f"webhook {hook.name}: no Prefect Secret block {hook.token_secret!r}; create it "
                                 f"with Secret(value=…).save({hook.token_secret!r})") from None
    return None


def save_blocks(hooks: list[Webhook]) -> list[UUID]:
    """One CustomWebhookNotificationBlock per target, overwritten on each serve; the token goes into the block's
    encrypted `secrets` (substituted for `{{token}}` when a message is sent), never into the config file."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    ids = []
    for hook in hooks:
        token = _token(hook)
        try:
            block = CustomWebhookNotificationBlock.model_validate(
                {"name": hook.name, "url": hook.url, "json_data": hook.payload, "headers": hook.headers or None,
                 "secrets": {"token": token} if token else {}})
        except (KeyError, ValueError) as e:
            raise VaultflowError(f"webhook {hook.name}: a placeholder has no value ({e}); only {{{{subject}}}}, "
                                 "{{body}}, {{name}} and, with token_env or token_secret, {{token}} exist") from None
        saved: Any = block.save(block_name(hook), overwrite=True)
        ids.append(saved)
    return ids


def notify(blocks: list[UUID], subject: str, body: str) -> list[Any]:
    return [SendNotification(block_document_id=b, subject=subject, body=body) for b in blocks]


def failed(label: str, blocks: list[UUID], ui_url: str) -> AutomationCore:
    """Any vaultflow flow run that ends Failed or Crashed: one message per target, within a second or two."""
    return AutomationCore(
        name=f"vaultflow/{label}: run failed", description="A vaultflow flow run ended Failed or Crashed.",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES},
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=notify(blocks, FAILED_SUBJECT, FAILED_BODY % ui_url.rstrip("/")))


def stale(cfg: Config, label: str, repository_id: str, source: Source, blocks: list[UUID],
          ui_url: str) -> AutomationCore:
    """Dead man's switch: no committed snapshot of `source` within its RPO. Prefect's proactive windows are fixed
    buckets, so the message comes one to three RPOs after the last commit, and again every RPO until one commits.
    Proactive messages carry no event fields: the text is fixed here."""
    return AutomationCore(
        name=f"vaultflow/{label}: {source.name} past RPO",
        description=f"No snapshot of {source.name} committed within its RPO of {source.rpo}.",
        trigger=EventTrigger(expect={COMMITTED_EVENT},
                             match={"prefect.resource.id": resource_id(repository_id, source.name)},
                             posture=Posture.Proactive, threshold=1, within=timedelta(seconds=seconds(source.rpo))),
        actions=notify(blocks, f"vaultflow: source {source.name} past its RPO of {source.rpo}",
                       f"no snapshot of source {source.name} was committed within its RPO of {source.rpo} "
                       f"(repository {label}, {cfg.repository.url}); this repeats every {source.rpo} until one is. "
                       f"Its backup runs: deployment backup/{source.name}, {ui_url.rstrip('/')}/runs"))


def zombies(heartbeat_seconds: int) -> AutomationCore:
    """A served run whose process died (SIGKILL, OOM, power) stays Running for ever: no heartbeat for three
    periods marks it Crashed, which the failure automation reports. CLI runs send no heartbeat and are not
    watched here (the next run that finds their stale lock marks them)."""
    return AutomationCore(
        name=ZOMBIES, description="Mark vaultflow flow runs Crashed when their heartbeats stop.",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *TERMINAL},
                             match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES},
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=3 * heartbeat_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, name=None, force=False,
                                    message=f"no heartbeat for {3 * heartbeat_seconds} s: its process died (killed, "
                                            "out of memory, machine down)")])


def desired(cfg: Config, repository_id: str, blocks: list[UUID], ui_url: str,
            heartbeat_seconds: int | None) -> list[AutomationCore]:
    label = cfg.repository.name or repository_id
    out = [zombies(heartbeat_seconds)] if heartbeat_seconds else []
    if blocks:  # an automation with nothing to send would only clutter the UI
        out.append(failed(label, blocks, ui_url))
        out += [stale(cfg, label, repository_id, s, blocks, ui_url) for s in cfg.sources]
    return out


def install(cfg: Config, repository_id: str, ui_url: str, heartbeat_seconds: int | None) -> list[str]:
    """Save the blocks, then make this repository's automations exactly the desired ones; their names."""
    from prefect.client.orchestration import get_client

    blocks = save_blocks(cfg.notify.webhooks)
    want = {a.name: a for a in desired(cfg, repository_id, blocks, ui_url, heartbeat_seconds)}
    mine = f"vaultflow/{cfg.repository.name or repository_id}: "
    with get_client(sync_client=True) as client:
        have: dict[str, Any] = {}
        for a in client.read_automations():
            if a.name in have or (a.name not in want and a.name.startswith(mine)):
                client.delete_automation(a.id)  # a duplicate, or a source no longer in the config
            elif a.name in want:
                have[a.name] = a
        for name, automation in want.items():
            if name in have:
                client.update_automation(have[name].id, automation)
            else:
                client.create_automation(automation)
    return sorted(want)


def ui_base(cfg: Config, api_url: str) -> str:
    """Where run links point: the config's ui_url, PREFECT_UI_URL, or the API's server without /api."""
    from prefect.settings import get_current_settings

    explicit = cfg.notify.ui_url or get_current_settings().ui_url
    return (explicit or api_url.rstrip("/").removesuffix("/api")).rstrip("/")
