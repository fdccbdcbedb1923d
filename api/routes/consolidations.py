"""Consolidations: start a multitask re-prune under one budget (admin), list, read and cancel
runs with their reports. Rolling a task back and a consolidated version's factored parts live
under /tasks (api/routes/tasks.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from api.deps import (
    CursorQuery,
    PageLimitQuery,
    Principal,
    SessionDep,
    SettingsDep,
    require,
)
from api.errors import ApiError
from api.routes.jobs import enqueue_job
from api.schemas import (
    ROUTE_ERRORS,
    ConsolidationCreate,
    ConsolidationPublic,
    ConsolidationsPublic,
)
from diffs.basemodel import canonical_base_name
from registry import catalog

router = APIRouter(prefix="/consolidations", tags=["consolidations"])

ERRORS = ROUTE_ERRORS

# Dense fp32 bytes per base parameter: the largest sensible byte budget per base parameter.
MAX_BYTES_PER_PARAM = 4


def _resolve_base(session, settings, body: ConsolidationCreate, tenant_id: int) -> tuple[str, int]:
    """The base model name the run is on and its size; 404/422 naming the field otherwise."""
    names: set[str] = set()
    for name in body.tasks or []:
        try:
            task = catalog.get_task(session, tenant_id=tenant_id, name=name)
        except catalog.NotFoundError:
            raise ApiError(404, "not_found", f"task {name!r} not found", field="tasks") from None
        names.add(task.base_model.name)
    if len(names) > 1:
        raise ApiError(
            422,
            "different_base_models",
            f"the tasks are on different base models: {', '.join(sorted(names))}",
            field="tasks",
        )
    requested = canonical_base_name(body.base_model) if body.base_model else None
    if names:
        base = names.pop()
        if requested is not None and requested != base:
            raise ApiError(
                422,
                "base_model_mismatch",
                f"the tasks are on base model {base!r}, not {requested!r}",
                field="base_model",
            )
    else:
        base = requested or canonical_base_name(settings.base_model)
    # A base only other tenants use answers as one nobody uses: no hint of their tasks.
    rows, _ = catalog.list_tasks(session, tenant_id=tenant_id, limit=1, base_model=base)
    if not rows:
        raise ApiError(
            422, "unknown_base_model", f"base model {base!r} has no tasks here", field="base_model"
        )
    row = catalog.get_base_model(session, name=base)
    return row.name, int(row.n_params)


@router.post(
    "",
    status_code=202,
    response_model=ConsolidationPublic,
    responses=ERRORS,
    summary="Start a consolidation (admin)",
)
def create_consolidation(
    body: ConsolidationCreate,
    request: Request,
    principal: Annotated[Principal, Depends(require("consolidations.create"))],
    session: SessionDep,
    settings: SettingsDep,
) -> ConsolidationPublic:
    """Validate, commit the run and its job, then enqueue `diffbank.consolidate(run_id)`."""
    base, n_params = _resolve_base(session, settings, body, principal.tenant_id)
    limit = n_params * (MAX_BYTES_PER_PARAM if body.budget_kind == "bytes" else 1)
    if body.budget > limit:
        raise ApiError(
            422,
            "budget_too_large",
            f"budget {body.budget} exceeds the base model's size ({limit} "
            f"{'bytes' if body.budget_kind == 'bytes' else 'parameters'})",
            field="budget",
        )
    tolerance = settings.consolidation_tolerance if body.tolerance is None else body.tolerance
    run = catalog.create_consolidation_run(
        session,
        tenant_id=principal.tenant_id,
        base_model=base,
        budget=body.budget,
        task_names=list(body.tasks) if body.tasks else None,
        strategy=body.strategy,
        budget_kind=body.budget_kind,
        tolerance=tolerance,
        trigger="api",
        params=body.params(),
        max_attempts=settings.job_max_attempts,
    )
    enqueue_job(request, session, "consolidate", job_id=run.job_id, run_id=run.id)
    return ConsolidationPublic.model_validate(
        catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run.id)
    )


@router.get(
    "",
    response_model=ConsolidationsPublic,
    responses=ERRORS,
    summary="List consolidation runs",
)
def list_consolidations(
    principal: Annotated[Principal, Depends(require("consolidations.read"))],
    session: SessionDep,
    cursor: CursorQuery = None,
    limit: PageLimitQuery = 50,
) -> ConsolidationsPublic:
    """Your runs, newest first, with cursor pagination."""
    runs, next_cursor = catalog.list_consolidation_runs(
        session, tenant_id=principal.tenant_id, cursor=cursor, limit=limit
    )
    return ConsolidationsPublic(
        items=[ConsolidationPublic.model_validate(r) for r in runs], next_cursor=next_cursor
    )


@router.get(
    "/{run_id}",
    response_model=ConsolidationPublic,
    responses=ERRORS,
    summary="Get a consolidation run and its report",
)
def get_consolidation(
    run_id: int,
    principal: Annotated[Principal, Depends(require("consolidations.read"))],
    session: SessionDep,
) -> ConsolidationPublic:
    """A run: state, progress, and per-task before/after metrics, nonzeros, bytes, acceptance."""
    return ConsolidationPublic.model_validate(
        catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run_id)
    )


@router.post(
    "/{run_id}/cancel",
    response_model=ConsolidationPublic,
    responses=ERRORS,
    summary="Cancel a consolidation run",
)
def cancel_consolidation(
    run_id: int,
    principal: Annotated[Principal, Depends(require("consolidations.cancel"))],
    session: SessionDep,
) -> ConsolidationPublic:
    """Cancel a queued run now, or ask its worker to stop (nothing is published)."""
    run = catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run_id)
    catalog.request_cancel(session, tenant_id=principal.tenant_id, job_id=run.job_id)
    return ConsolidationPublic.model_validate(
        catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run_id)
    )
