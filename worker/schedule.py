"""When consolidation runs by itself: the beat entry from Settings and the budget policy.

`consolidation_schedule` is "" (off), "every <seconds>", or a 5-field cron line
("minute hour day-of-month month day-of-week", UTC). At each tick the policy looks at every
tenant's tasks grouped by base: when their total stored nonzeros (active versions; a shared
consolidation diff counted once) exceed `consolidation_budget_nnz`, it creates a consolidation
run of those tasks with that budget (trigger 'schedule') and enqueues it, unless a run for
the same tenant and base is still queued or running.

Imports no torch: the beat process loads this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from celery.schedules import crontab

from registry.settings import Settings

POLICY_TASK = "diffbank.consolidation_policy"
POLICY_ENTRY = "consolidation-policy"
_EVERY = re.compile(r"^every\s+(\d+(?:\.\d+)?)\s*s?$")


class ScheduleError(ValueError):
    """A `consolidation_schedule` value that is neither "every <seconds>" nor a 5-field cron line."""


def parse_schedule(text: str) -> float | crontab | None:
    """Seconds between runs, a crontab, or None when the schedule is off."""
    text = text.strip()
    if not text:
        return None
    every = _EVERY.match(text)
    if every:
        seconds = float(every.group(1))
        if seconds <= 0:
            raise ScheduleError(
                "consolidation_schedule: 'every' needs a positive number of seconds"
            )
        return seconds
    fields = text.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"consolidation_schedule {text!r}: expected 'every <seconds>' or a 5-field cron line"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except (ValueError, TypeError) as exc:
        raise ScheduleError(f"consolidation_schedule {text!r}: {exc}") from exc


def consolidation_beat_schedule(settings: Settings) -> dict:
    """The beat entry running the consolidation policy, or {} when scheduling is off."""
    schedule = parse_schedule(settings.consolidation_schedule)
    if schedule is None or settings.consolidation_budget_nnz <= 0:
        return {}
    return {
        POLICY_ENTRY: {
            "task": POLICY_TASK,
            "schedule": schedule,
            "options": {"queue": "maintenance"},
        }
    }


@dataclass(frozen=True)
class PolicyCandidate:
    """A tenant's task set on one base whose stored total exceeds the threshold."""

    tenant_id: int
    base_model: str
    task_names: tuple[str, ...]
    total_nnz: int


def over_budget_groups(
    stored: list[tuple[int, str, str, int, int | None, int]], threshold: int
) -> list[PolicyCandidate]:
    """Groups whose stored total exceeds `threshold`.

    `stored` rows: (tenant_id, base_model, task_name, own_entries, shared_artifact_id,
    shared_entries) per active version; a shared artifact counts once per group.
    """
    if threshold <= 0:
        return []
    groups: dict[tuple[int, str], dict] = {}
    for tenant_id, base_model, task_name, own, shared_id, shared_entries in stored:
        group = groups.setdefault((tenant_id, base_model), {"tasks": [], "own": 0, "shared": {}})
        group["tasks"].append(task_name)
        group["own"] += int(own)
        if shared_id is not None:
            group["shared"][shared_id] = int(shared_entries)
    candidates = []
    for (tenant_id, base_model), group in sorted(groups.items()):
        total = group["own"] + sum(group["shared"].values())
        if total > threshold:
            candidates.append(
                PolicyCandidate(tenant_id, base_model, tuple(sorted(group["tasks"])), total)
            )
    return candidates


def stored_entries_of(version: Any) -> tuple[int, int | None, int]:
    """(own stored entries, shared artifact id or None, the shared part's entries) of a version.

    A consolidated version stores its residual's entries (`config["stored_entries"]`) plus a
    share of the run's shared diff; any other version stores its diff's nonzeros.
    """
    config = version.config or {}
    if version.shared_artifact_id is not None and "stored_entries" in config:
        return (
            int(config["stored_entries"]),
            int(version.shared_artifact_id),
            int(config.get("shared_stored_entries", 0)),
        )
    return int(version.nnz), None, 0


def total_stored_entries(versions: list[Any]) -> int:
    """Stored entries of a set of versions, each shared diff counted once."""
    own = 0
    shared: dict[int, int] = {}
    for version in versions:
        entries, shared_id, shared_entries = stored_entries_of(version)
        own += entries
        if shared_id is not None:
            shared[shared_id] = shared_entries
    return own + sum(shared.values())


def stored_rows(session: Any) -> list[tuple[int, str, str, int, int | None, int]]:
    """(tenant, base, task, own entries, shared artifact id, shared entries) per active version."""
    from sqlalchemy import and_, select

    from registry import catalog
    from registry.models import BaseModel, Task, TaskVersion

    query = (
        select(Task.tenant_id, BaseModel.name, Task.name, TaskVersion)
        .join(BaseModel, Task.base_model_id == BaseModel.id)
        .join(
            TaskVersion,
            and_(TaskVersion.task_id == Task.id, TaskVersion.number == Task.active_version),
        )
        .order_by(Task.tenant_id, BaseModel.name, Task.name)
    )
    with catalog.transaction(session):
        found = session.execute(query).unique().all()
    return [
        (tenant, base, name, *stored_entries_of(version)) for tenant, base, name, version in found
    ]


def _run_in_flight(session: Any, tenant_id: int, base_model: str) -> bool:
    """Whether a consolidation of this tenant and base is still queued or running."""
    from sqlalchemy import select

    from registry import catalog
    from registry.models import ConsolidationRun, Job

    with catalog.transaction(session):
        found = session.scalar(
            select(ConsolidationRun.id)
            .join(Job, ConsolidationRun.job_id == Job.id)
            .where(
                ConsolidationRun.tenant_id == tenant_id,
                ConsolidationRun.base_model == base_model,
                Job.state.in_(("queued", "running")),
            )
            .limit(1)
        )
    return found is not None


def apply_consolidation_policy(settings: Settings, *, send: Any = None) -> list[int]:
    """Create and enqueue a scheduled run for every group over the threshold; the new run ids.

    `send(run_id)` enqueues a run (default: `diffbank.consolidate` on the consolidate queue).
    """
    from registry import catalog
    from registry.db import get_session_factory

    threshold = settings.consolidation_budget_nnz
    if threshold <= 0:
        return []
    if send is None:
        send = _sender(settings)
    sessions = get_session_factory(settings)
    created = []
    with sessions() as session:
        for group in over_budget_groups(stored_rows(session), threshold):
            if _run_in_flight(session, group.tenant_id, group.base_model):
                continue
            run = catalog.create_consolidation_run(
                session,
                tenant_id=group.tenant_id,
                base_model=group.base_model,
                budget=threshold,
                task_names=list(group.task_names),
                tolerance=settings.consolidation_tolerance,
                trigger="schedule",
                max_attempts=settings.job_max_attempts,
            )
            send(run.id)
            catalog.mark_enqueued(session, job_id=run.job_id)
            created.append(run.id)
    return created


def _sender(settings: Settings) -> Any:
    """A function enqueueing `diffbank.consolidate(run_id)` on the configured broker."""
    from worker.app import CONSOLIDATE_QUEUE, CONSOLIDATE_TASK, make_celery_app

    app = make_celery_app(settings)

    def send(run_id: int) -> None:
        app.send_task(CONSOLIDATE_TASK, args=[run_id], queue=CONSOLIDATE_QUEUE)

    return send
