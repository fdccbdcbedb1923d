"""The consolidation budget policy: which task sets to consolidate, and starting their runs.

At each tick (`worker.beat` schedules it from `consolidation_schedule`) the policy looks at
every tenant's tasks grouped by base: when their total stored nonzeros (active versions; a
shared consolidation diff counted once) exceed `consolidation_budget_nnz`, it creates a
consolidation run of those tasks with that budget (trigger 'schedule') and enqueues it,
unless a run for the same tenant and base is still queued or running.

Imports no torch: the beat process loads this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kombu import Connection

from registry.settings import Settings
from worker.app import broker_url, celery_app, enqueue


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


def apply_consolidation_policy(settings: Settings) -> list[int]:
    """Create and enqueue a scheduled run for every group over the threshold; the new run ids."""
    from registry import catalog
    from registry.db import get_session_factory

    threshold = settings.consolidation_budget_nnz
    if threshold <= 0:
        return []
    sessions = get_session_factory(settings)
    created = []
    with sessions() as session, Connection(broker_url(settings)) as connection:
        for group in over_budget_groups(stored_rows(session), threshold):
            if catalog.consolidation_in_flight(
                session, tenant_id=group.tenant_id, base_model=group.base_model
            ):
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
            enqueue(
                celery_app, "consolidate", job_id=run.job_id, run_id=run.id, connection=connection
            )
            catalog.mark_enqueued(session, job_id=run.job_id)
            created.append(run.id)
    return created
