"""Interference between the caller's task diffs on one base: `GET /v1/interference`.

Support overlap (Jaccard), sign agreement on shared positions and cosine between the active
versions of the named tasks (default: every task of the caller on the base), a consolidated
version counted as its composed diff; plus the groups the scheduled consolidation policy would
form among them. Definitions and the null model: diffs/interference.py. A diff that cannot be
read, or diffs that do not fit one base, answer 409 `artifact_mismatch` naming `tasks`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.deps import Principal, SessionDep, SettingsDep, StoreDep, require
from api.errors import ApiError, artifact_mismatch
from api.schemas import ROUTE_ERRORS, InterferencePublic
from diffs.basemodel import canonical_base_name, public_base_name
from registry import catalog
from registry.catalog.pagination import MAX_PAGE_SIZE
from registry.models import Task

router = APIRouter(prefix="/interference", tags=["tasks"])

TasksQuery = Annotated[
    str | None,
    Query(
        max_length=100_000,
        description="comma-separated task names (default: every task of yours on the base)",
    ),
]
BaseModelQuery = Annotated[
    str | None,
    Query(
        min_length=1, max_length=512, description="the base (default: the tasks' or the server's)"
    ),
]


@router.get(
    "",
    response_model=InterferencePublic,
    responses=ROUTE_ERRORS,
    summary="Interference between task diffs",
)
def get_interference(
    principal: Annotated[Principal, Depends(require("interference.read"))],
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    tasks: TasksQuery = None,
    base_model: BaseModelQuery = None,
) -> InterferencePublic:
    """Jaccard, sign agreement and cosine of every pair of tasks, and the policy's groups."""
    from diffs.interference import InterferenceError, pairwise_interference, settings_groups

    limit = settings.interference_max_tasks
    names = parse_task_names(tasks, limit) if tasks is not None else None
    base, rows = _resolve_tasks(session, settings, principal.tenant_id, names, base_model)
    if len(rows) > limit:
        raise ApiError(
            422,
            "too_many_tasks",
            f"{len(rows)} tasks on base model {base!r}; name at most {limit} with `tasks`",
            field="tasks",
        )
    fingerprint = catalog.get_base_model(session, name=base).fingerprint
    versions = [
        catalog.get_task_version(session, tenant_id=principal.tenant_id, name=task.name)
        for task in rows
    ]
    diffs = [
        _read_diff(store, task.name, version, fingerprint)
        for task, version in zip(rows, versions, strict=True)
    ]
    try:
        matrix = pairwise_interference(diffs, [task.name for task in rows])
    except InterferenceError as exc:
        raise ApiError(
            409, "artifact_mismatch", f"the diffs cannot be compared: {exc}", field="tasks"
        ) from None
    groups = settings_groups(matrix, settings)
    return InterferencePublic(
        base_model=public_base_name(base),
        versions=[v.number for v in versions],
        groups=groups,
        **matrix.to_json(),
    )


def _read_diff(store, name: str, version, fingerprint: str):
    """The diff a task's version stands for; 409 naming `tasks` if it cannot be read."""
    from api.routes.tasks import COMPOSED
    from diffs.types import ArtifactError
    from registry.layouts import version_diff

    try:
        return version_diff(store, version, expected_fingerprint=fingerprint, cache=COMPOSED)
    except ArtifactError as exc:
        raise artifact_mismatch(name, version.number, exc, cannot="read", field="tasks") from None


def parse_task_names(raw: str, limit: int) -> list[str]:
    """The names of a comma-separated `tasks` parameter; 422 naming the field otherwise."""
    names = [name.strip() for name in raw.split(",")]
    if not all(names):
        raise ApiError(422, "invalid_tasks", "tasks must be comma-separated names", field="tasks")
    if len(set(names)) != len(names):
        raise ApiError(422, "invalid_tasks", "tasks must not repeat a task", field="tasks")
    if len(names) > limit:
        raise ApiError(
            422, "too_many_tasks", f"at most {limit} tasks, got {len(names)}", field="tasks"
        )
    return names


def _resolve_tasks(
    session, settings, tenant_id: int, names: list[str] | None, base_model: str | None
) -> tuple[str, list[Task]]:
    """The base and the caller's tasks to compare, each with an active version."""
    requested = canonical_base_name(base_model) if base_model else None
    if names is None:
        base = requested or canonical_base_name(settings.base_model)
        rows = [t for t in _tasks_on_base(session, tenant_id, base) if t.active_version]
        if not rows:  # a base only other tenants use answers as one nobody uses
            raise ApiError(
                422,
                "unknown_base_model",
                f"base model {base!r} has no task with a published version here",
                field="base_model",
            )
        return base, sorted(rows, key=lambda t: t.name)
    rows = []
    for name in names:
        try:
            rows.append(catalog.get_task(session, tenant_id=tenant_id, name=name))
        except catalog.NotFoundError:
            raise ApiError(404, "not_found", f"task {name!r} not found", field="tasks") from None
    bases = sorted({task.base_model.name for task in rows})
    if len(bases) > 1:
        raise ApiError(
            422,
            "different_base_models",
            f"the tasks are on different base models: {', '.join(bases)}",
            field="tasks",
        )
    if requested is not None and requested != bases[0]:
        raise ApiError(
            422,
            "base_model_mismatch",
            f"the tasks are on base model {bases[0]!r}, not {requested!r}",
            field="base_model",
        )
    for task in rows:
        if task.active_version is None:
            raise ApiError(
                422, "no_version", f"task {task.name!r} has no published version", field="tasks"
            )
    return bases[0], rows


def _tasks_on_base(session, tenant_id: int, base: str) -> list[Task]:
    """Every task of the tenant on `base`, all pages."""
    rows, cursor = [], None
    while True:
        page, cursor = catalog.list_tasks(
            session, tenant_id=tenant_id, base_model=base, cursor=cursor, limit=MAX_PAGE_SIZE
        )
        rows.extend(page)
        if cursor is None:
            return rows
