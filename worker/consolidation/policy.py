"""The consolidation budget policy: which task groups to consolidate, and starting their runs.

At each tick (`worker.beat` schedules it from `consolidation_schedule`) the policy looks at
every tenant's tasks grouped by base. When their total stored nonzeros (active versions; a
shared consolidation diff counted once) exceed `consolidation_budget_nnz`, it reads every
task's diff (a consolidated version's composed diff), computes their interference
(`diffs.interference`) and forms groups in which every pair of tasks overlaps and agrees in
sign more than independent random diffs would (null-model tests at the family-wise level
`consolidation_group_alpha`), at most `consolidation_group_max_tasks` tasks each.

Each group of two or more tasks gets its own run (trigger 'schedule') with its share of the
threshold as budget: threshold x (the group's stored entries / the tenant's stored entries on
that base), so every group is asked for the compression the tenant needs as a whole. A task in
no group keeps its version: a joint re-prune of unrelated diffs has nothing to share, so the
tenant may stay over the threshold by those tasks. A group is skipped when it already fits its
share, or when any of its tasks is in a queued or running run (one run per disjoint group).

Tasks in a queued or running run are dropped before any diff is read, and at most
`interference_max_tasks` tasks per tenant and base are compared (those storing the most own
entries). Groups are cached by the compared versions' artifact digests and the group settings,
so a tick over an unchanged task set reads no diff. A pair must also reach the effect-size
minimums `consolidation_group_min_sign_agreement` and `consolidation_group_min_overlap_lift`.
A task on another base fingerprint, or diffs that cannot be compared, form no group (logged);
they never stop the tick for later tenants.

Imports no torch at module level: the beat process loads this module.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kombu import Connection

from settings import Settings
from worker.app import broker_url, celery_app, enqueue

log = logging.getLogger(__name__)

StoredEntries = tuple[int, int | None, int]  # own entries, shared artifact id, shared entries
GROUPS_CACHE_SIZE = 256  # task sets whose groups are remembered (least recently used out)
_GROUPS_CACHE: OrderedDict[tuple, list[list[str]]] = OrderedDict()


@dataclass(frozen=True)
class PolicyCandidate:
    """A tenant's task set on one base whose stored total exceeds the threshold."""

    tenant_id: int
    base_model: str
    task_names: tuple[str, ...]
    total_nnz: int


@dataclass(frozen=True)
class GroupRun:
    """One run the policy starts: a group's tasks, what they store now, and their budget."""

    task_names: tuple[str, ...]
    stored: int
    budget: int


def over_budget_groups(
    stored: list[tuple[int, str, str, int, int | None, int]], threshold: int
) -> list[PolicyCandidate]:
    """Task sets (one per tenant and base) whose stored total exceeds `threshold`.

    `stored` rows: (tenant_id, base_model, task_name, own_entries, shared_artifact_id,
    shared_entries) per active version; a shared artifact counts once per set.
    """
    if threshold <= 0:
        return []
    sets: dict[tuple[int, str], list[tuple[str, StoredEntries]]] = {}
    for tenant_id, base_model, task_name, *entries in stored:
        sets.setdefault((tenant_id, base_model), []).append((task_name, tuple(entries)))
    candidates = []
    for (tenant_id, base_model), tasks in sorted(sets.items()):
        total = stored_total(entries for _, entries in tasks)
        if total > threshold:
            names = tuple(sorted(name for name, _ in tasks))
            candidates.append(PolicyCandidate(tenant_id, base_model, names, total))
    return candidates


def stored_total(entries: Iterable[StoredEntries]) -> int:
    """Stored entries of a set of versions' (own, shared id, shared entries), shared once."""
    own = 0
    shared: dict[int, int] = {}
    for entries_own, shared_id, shared_entries in entries:
        own += int(entries_own)
        if shared_id is not None:
            shared[shared_id] = int(shared_entries)
    return own + sum(shared.values())


def plan_group_runs(
    groups: list[list[str]],
    stored: dict[str, StoredEntries],
    *,
    threshold: int,
    total: int,
    busy: set[str],
) -> list[GroupRun]:
    """The runs to start: each group's budget is threshold x its stored entries / `total`.

    Groups with a task in `busy` (a run in flight), that already fit their share, or whose
    share is below one entry start nothing.
    """
    runs = []
    for group in groups:
        if busy & set(group):
            continue
        entries = stored_total(stored[name] for name in group)
        budget = threshold * entries // max(total, 1)
        if 1 <= budget < entries:
            runs.append(GroupRun(tuple(group), entries, budget))
    return runs


def stored_entries_of(version: Any) -> StoredEntries:
    """(own stored entries, shared artifact id or None, the shared part's entries) of a version.

    A consolidated version stores its residual's entries (`config["stored_entries"]`) plus a
    share of the run's shared diff; any other version stores its diff's nonzeros.
    """
    from registry.layouts import SINGLE, layout_of

    config = version.config or {}
    if layout_of(version) != SINGLE and "stored_entries" in config:
        return (
            int(config["stored_entries"]),
            int(version.shared_artifact_id),
            int(config.get("shared_stored_entries", 0)),
        )
    return int(version.nnz), None, 0


def total_stored_entries(versions: list[Any]) -> int:
    """Stored entries of a set of versions, each shared diff counted once."""
    return stored_total(stored_entries_of(version) for version in versions)


def active_versions(session: Any) -> list[tuple[int, str, str, Any]]:
    """(tenant, base, task, active TaskVersion) of every task with an active version."""
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
        return [tuple(row) for row in session.execute(query).unique().all()]


def stored_rows(session: Any) -> list[tuple[int, str, str, int, int | None, int]]:
    """(tenant, base, task, own entries, shared artifact id, shared entries) per active version."""
    return [
        (tenant, base, name, *stored_entries_of(version))
        for tenant, base, name, version in active_versions(session)
    ]


def compared_tasks(versions: dict[str, Any], busy: set[str], limit: int) -> dict[str, Any]:
    """The tasks the policy compares: none in a run in flight, and at most `limit` of them,
    those storing the most own entries first (ties by name)."""
    free = {name: version for name, version in versions.items() if name not in busy}
    ranked = sorted(free, key=lambda name: (-stored_entries_of(free[name])[0], name))
    return {name: free[name] for name in sorted(ranked[: max(limit, 0)])}


def _groups_key(versions: dict[str, Any], fingerprint: str | None, settings: Settings) -> tuple:
    """What a set's groups depend on: its versions' artifact digests and the group settings."""
    digests = tuple(
        sorted(
            (name, v.artifact.sha256, v.shared_artifact.sha256 if v.shared_artifact else None)
            for name, v in versions.items()
        )
    )
    return (
        digests,
        fingerprint,
        settings.consolidation_group_alpha,
        settings.consolidation_group_max_tasks,
        settings.consolidation_group_min_sign_agreement,
        settings.consolidation_group_min_overlap_lift,
    )


def interference_groups(
    store: Any,
    versions: dict[str, Any],
    settings: Settings,
    *,
    base_fingerprint: str | None = None,
) -> list[list[str]]:
    """The consolidation groups among `versions` (task name -> active version) by their diffs.

    A task whose diff cannot be read, or is on another fingerprint than `base_fingerprint`, is
    left out of every group; diffs that cannot be compared form no group; both are logged.
    Groups are cached by `_groups_key`, so a tick over an unchanged task set reads no diff
    (not cached when the store failed: that may pass).
    """
    from diffs.interference import InterferenceError, pairwise_interference, settings_groups
    from diffs.types import ArtifactError
    from registry.layouts import version_diff
    from registry.stores.base import ObjectStoreError

    key = _groups_key(versions, base_fingerprint, settings)
    if key in _GROUPS_CACHE:
        _GROUPS_CACHE.move_to_end(key)
        return [list(group) for group in _GROUPS_CACHE[key]]
    names, diffs, store_failed = [], [], False
    for name, version in sorted(versions.items()):
        try:
            diffs.append(version_diff(store, version, expected_fingerprint=base_fingerprint))
        except (ArtifactError, ObjectStoreError) as exc:
            store_failed |= isinstance(exc, ObjectStoreError)
            log.warning("consolidation policy: cannot read task %r (%s); left out", name, exc)
            continue
        names.append(name)
    groups: list[list[str]] = []
    if len(diffs) >= 2:
        try:
            matrix = pairwise_interference(diffs, names)
        except InterferenceError as exc:
            log.warning("consolidation policy: cannot compare tasks %s (%s); no group", names, exc)
        else:
            groups = settings_groups(matrix, settings)
    if not store_failed:
        _GROUPS_CACHE[key] = [list(group) for group in groups]
        while len(_GROUPS_CACHE) > GROUPS_CACHE_SIZE:
            _GROUPS_CACHE.popitem(last=False)
    return groups


def apply_consolidation_policy(settings: Settings) -> list[int]:
    """Create and enqueue a scheduled run for every group of an over-threshold task set."""
    from registry import catalog
    from registry.catalog.consolidation import tasks_in_flight
    from registry.db import get_session_factory
    from registry.stores import open_store

    threshold = settings.consolidation_budget_nnz
    if threshold <= 0:
        return []
    sessions = get_session_factory(settings)
    store = open_store(settings.store_url, settings)
    created = []
    with sessions() as session, Connection(broker_url(settings)) as connection:
        found = active_versions(session)
        rows = [(t, b, n, *stored_entries_of(v)) for t, b, n, v in found]
        for candidate in over_budget_groups(rows, threshold):
            key = (candidate.tenant_id, candidate.base_model)
            versions = {n: v for t, b, n, v in found if (t, b) == key}
            busy = tasks_in_flight(
                session, tenant_id=candidate.tenant_id, base_model=candidate.base_model
            )
            compared = compared_tasks(versions, busy, settings.interference_max_tasks)
            free = len(set(versions) - busy)
            if len(compared) < free:
                log.info(
                    "consolidation policy: tenant %s on %s: comparing the %d of %d tasks that "
                    "store the most",
                    candidate.tenant_id,
                    candidate.base_model,
                    len(compared),
                    free,
                )
            fingerprint = catalog.get_base_model(session, name=candidate.base_model).fingerprint
            groups = interference_groups(store, compared, settings, base_fingerprint=fingerprint)
            stored = {n: stored_entries_of(v) for n, v in versions.items()}
            plan = plan_group_runs(
                groups, stored, threshold=threshold, total=candidate.total_nnz, busy=busy
            )
            for group in plan:
                try:
                    run = catalog.create_consolidation_run(
                        session,
                        tenant_id=candidate.tenant_id,
                        base_model=candidate.base_model,
                        budget=group.budget,
                        task_names=list(group.task_names),
                        tolerance=settings.consolidation_tolerance,
                        trigger="schedule",
                        max_attempts=settings.job_max_attempts,
                    )
                except (catalog.ConflictError, catalog.InvalidInputError) as exc:
                    # a run over one of its tasks started meanwhile, or its data is gone
                    log.warning("consolidation policy: group %s not started: %s", group, exc)
                    continue
                enqueue(
                    celery_app,
                    "consolidate",
                    job_id=run.job_id,
                    run_id=run.id,
                    connection=connection,
                )
                catalog.mark_enqueued(session, job_id=run.job_id)
                created.append(run.id)
    return created
