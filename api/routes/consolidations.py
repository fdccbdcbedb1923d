"""Consolidations: start a multitask re-prune under one budget (admin), read runs and reports,
roll a task back to any version, and download a consolidated version's factored parts.

A consolidated task version's `artifact` is the composed diff (what `GET /v1/tasks/{name}/diff`
returns by default). Its parts — the run's shared diff and the task's residual — are listed by
`GET /v1/tasks/{name}/versions/{n}/parts` (also what `GET /v1/tasks/{name}/diff?layout=factored`
answers): JSON with a download URL per part, to be applied in the listed order.
"""

from __future__ import annotations

import itertools
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import (
    AdminPrincipal,
    CursorQuery,
    PageLimitQuery,
    ReadPrincipal,
    SessionDep,
    SettingsDep,
    StoreDep,
    SubmitPrincipal,
)
from api.errors import ApiError
from api.schemas import ROUTE_ERRORS, TaskName, TaskPublic
from registry import catalog
from registry.basemodel import canonical_base_name
from registry.models import Artifact, ConsolidationRun, TaskVersion

log = logging.getLogger(__name__)

router = APIRouter(tags=["consolidations"])

ERRORS = ROUTE_ERRORS
TaskNamePath = Annotated[str, Path(max_length=128)]

# Dense fp32 bytes per base parameter: the largest sensible byte budget per base parameter.
MAX_BYTES_PER_PARAM = 4


class ConsolidationCreate(BaseModel):
    """Re-fit `tasks` (default: every task of yours on the base) under one budget."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskName] | None = Field(default=None, min_length=1, max_length=64)
    budget: int = Field(ge=1, description="total stored nonzeros (or bytes), shared part once")
    budget_kind: Literal["nnz", "bytes"] = "nnz"
    strategy: Literal["elementwise", "rank"] = "elementwise"
    tolerance: float | None = Field(
        default=None, ge=0.0, le=100.0, description="accuracy points a task may lose"
    )
    base_model: str | None = Field(default=None, min_length=1, max_length=512)
    epochs: float | None = Field(default=None, gt=0.0, le=100.0)
    fix_epochs: float | None = Field(default=None, ge=0.0, le=100.0)
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_length: int | None = Field(default=None, ge=8, le=512)
    lr: float | None = Field(default=None, gt=0.0, le=1.0)
    temperature: float | None = Field(default=None, gt=0.0, le=100.0)
    rank: int | None = Field(default=None, ge=1, le=256)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)

    def params(self) -> dict[str, Any]:
        """The hyperparameters the caller set (others keep ConsolidationConfig's defaults)."""
        knobs = self.model_dump(
            exclude={"tasks", "budget", "budget_kind", "strategy", "tolerance", "base_model"},
            exclude_none=True,
        )
        return dict(sorted(knobs.items()))


class ConsolidationTaskPublic(BaseModel):
    """One task's line of a run report."""

    model_config = ConfigDict(extra="allow")

    task: str
    metric_name: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    nnz_before: int | None = None
    nnz: int | None = None
    bytes: int | None = None
    accepted: bool | None = None
    version_before: int | None = None
    version_after: int | None = None


class ConsolidationPublic(BaseModel):
    """A consolidation run, its job's state and, once finished, its report."""

    id: int
    job_id: int
    state: str
    trigger: str
    base_model: str
    strategy: str
    budget: int
    budget_kind: str
    tolerance: float
    task_names: list[str]
    progress: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    total_nnz_before: int | None = None
    total_nnz_after: int | None = None
    shared_nnz: int | None = None
    tasks: list[ConsolidationTaskPublic] = Field(default_factory=list)
    report: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    finished_at: datetime | None = None


class ConsolidationsPublic(BaseModel):
    """A page of runs, newest first."""

    items: list[ConsolidationPublic]
    next_cursor: str | None = None


class VersionPartPublic(BaseModel):
    """One stored part of a factored (consolidated) version."""

    role: Literal["shared", "residual"]
    sha256: str
    size_bytes: int
    url: str


class VersionPartsPublic(BaseModel):
    """A consolidated version's parts: apply `shared`, then `residual`, to get the composed diff."""

    layout: Literal["factored"] = "factored"
    task: str
    version: int
    consolidation_run_id: int | None
    composed_sha256: str
    parts: list[VersionPartPublic]


def consolidation_public(run: ConsolidationRun) -> ConsolidationPublic:
    """The API view of a run row (with its job)."""
    job = run.job
    report = run.report or {}
    error = None
    if job.error_code or job.error_message:
        error = {"code": job.error_code, "message": job.error_message}
    return ConsolidationPublic(
        id=run.id,
        job_id=run.job_id,
        state=job.state,
        trigger=run.trigger,
        base_model=run.base_model,
        strategy=run.strategy,
        budget=int(run.budget),
        budget_kind=run.budget_kind,
        tolerance=float(run.tolerance),
        task_names=list(run.task_names or []),
        progress=dict(job.progress or {}),
        error=error,
        total_nnz_before=run.total_nnz_before,
        total_nnz_after=run.total_nnz_after,
        shared_nnz=report.get("shared_nnz"),
        tasks=[ConsolidationTaskPublic(**row) for row in report.get("tasks", [])],
        report=report,
        created_at=run.created_at,
        finished_at=job.finished_at,
    )


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
    try:
        row = catalog.get_base_model(session, name=base)
    except catalog.NotFoundError:
        raise ApiError(
            422, "unknown_base_model", f"base model {base!r} has no tasks here", field="base_model"
        ) from None
    return row.name, int(row.n_params)


@router.post(
    "/consolidations",
    status_code=202,
    response_model=ConsolidationPublic,
    responses=ERRORS,
    summary="Start a consolidation (admin)",
)
def create_consolidation(
    body: ConsolidationCreate,
    request: Request,
    principal: AdminPrincipal,
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
    _enqueue(request, session, run)
    return consolidation_public(
        catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run.id)
    )


def _enqueue(request: Request, session, run: ConsolidationRun) -> None:
    """Send the run's message after its rows committed; a broker failure leaves it to the sweep."""
    from worker.app import CONSOLIDATE_QUEUE, CONSOLIDATE_TASK

    try:
        request.app.state.celery.send_task(CONSOLIDATE_TASK, args=[run.id], queue=CONSOLIDATE_QUEUE)
    except Exception:  # the job stays queued; the periodic sweep re-sends it
        log.exception("could not enqueue consolidation run %s; the sweep will re-send it", run.id)
        return
    catalog.mark_enqueued(session, job_id=run.job_id)


@router.get(
    "/consolidations",
    response_model=ConsolidationsPublic,
    responses=ERRORS,
    summary="List consolidation runs",
)
def list_consolidations(
    principal: ReadPrincipal,
    session: SessionDep,
    cursor: CursorQuery = None,
    limit: PageLimitQuery = 50,
) -> ConsolidationsPublic:
    """Your runs, newest first, with cursor pagination."""
    runs, next_cursor = catalog.list_consolidation_runs(
        session, tenant_id=principal.tenant_id, cursor=cursor, limit=limit
    )
    return ConsolidationsPublic(
        items=[consolidation_public(r) for r in runs], next_cursor=next_cursor
    )


@router.get(
    "/consolidations/{run_id}",
    response_model=ConsolidationPublic,
    responses=ERRORS,
    summary="Get a consolidation run and its report",
)
def get_consolidation(
    run_id: int, principal: ReadPrincipal, session: SessionDep
) -> ConsolidationPublic:
    """A run: state, progress, and per-task before/after metrics, nonzeros, bytes, acceptance."""
    return consolidation_public(
        catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run_id)
    )


@router.post(
    "/consolidations/{run_id}/cancel",
    response_model=ConsolidationPublic,
    responses=ERRORS,
    summary="Cancel a consolidation run",
)
def cancel_consolidation(
    run_id: int, principal: AdminPrincipal, session: SessionDep
) -> ConsolidationPublic:
    """Cancel a queued run now, or ask its worker to stop (nothing is published)."""
    run = catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run_id)
    catalog.request_cancel(session, tenant_id=principal.tenant_id, job_id=run.job_id)
    return consolidation_public(
        catalog.get_consolidation_run(session, tenant_id=principal.tenant_id, run_id=run_id)
    )


@router.post(
    "/tasks/{name}/versions/{number}/activate",
    response_model=TaskPublic,
    responses=ERRORS,
    summary="Serve a given version (rollback)",
)
def activate_version(
    name: TaskNamePath,
    number: Annotated[int, Path(ge=1)],
    principal: SubmitPrincipal,
    session: SessionDep,
) -> TaskPublic:
    """Make version `number` the active one, e.g. to undo a consolidation."""
    from api.routes.tasks import task_public

    catalog.activate_version(session, tenant_id=principal.tenant_id, name=name, number=number)
    return task_public(catalog.get_task(session, tenant_id=principal.tenant_id, name=name))


def version_parts(version: TaskVersion, *, name: str, session) -> VersionPartsPublic:
    """The factored layout of a consolidated version; 409 for a version that has no parts."""
    if version.shared_artifact_id is None or version.residual_artifact_id is None:
        raise ApiError(
            409,
            "not_factored",
            f"version {version.number} of task {name!r} is not a consolidated version "
            "and has no factored layout",
            field="layout",
        )
    with catalog.transaction(session):
        shared = session.get(Artifact, version.shared_artifact_id)
        residual = session.get(Artifact, version.residual_artifact_id)
    base_url = f"/v1/tasks/{name}/versions/{version.number}/parts"
    return VersionPartsPublic(
        task=name,
        version=version.number,
        consolidation_run_id=version.consolidation_run_id,
        composed_sha256=version.artifact.sha256,
        parts=[
            VersionPartPublic(
                role="shared",
                sha256=shared.sha256,
                size_bytes=shared.size_bytes,
                url=f"{base_url}/shared",
            ),
            VersionPartPublic(
                role="residual",
                sha256=residual.sha256,
                size_bytes=residual.size_bytes,
                url=f"{base_url}/residual",
            ),
        ],
    )


@router.get(
    "/tasks/{name}/versions/{number}/parts",
    response_model=VersionPartsPublic,
    responses=ERRORS,
    summary="List a consolidated version's shared and residual diffs",
)
def list_version_parts(
    name: TaskNamePath,
    number: Annotated[int, Path(ge=1)],
    principal: ReadPrincipal,
    session: SessionDep,
) -> VersionPartsPublic:
    """The factored layout: the shared diff and the task's residual, each an artifact."""
    version = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=number
    )
    return version_parts(version, name=name, session=session)


@router.get(
    "/tasks/{name}/versions/{number}/parts/{role}",
    response_class=StreamingResponse,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    summary="Download one part of a consolidated version",
)
def download_version_part(
    name: TaskNamePath,
    number: Annotated[int, Path(ge=1)],
    role: Literal["shared", "residual"],
    principal: ReadPrincipal,
    session: SessionDep,
    store: StoreDep,
) -> StreamingResponse:
    """The shared or residual artifact (the usual format), sha256-verified while streaming."""
    version = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=number
    )
    parts = version_parts(version, name=name, session=session)
    part = next(p for p in parts.parts if p.role == role)
    artifact_id = version.shared_artifact_id if role == "shared" else version.residual_artifact_id
    with catalog.transaction(session):
        artifact = session.get(Artifact, artifact_id)
    chunks = store.open(artifact.object_key, sha256=artifact.sha256)
    first = next(chunks, b"")
    headers = {
        "ETag": f'"{part.sha256}"',
        "X-Diffbank-Sha256": part.sha256,
        "Content-Length": str(part.size_bytes),
        "Content-Disposition": f'attachment; filename="{name}-v{number}-{role}.safetensors"',
    }
    return StreamingResponse(
        itertools.chain([first], chunks), headers=headers, media_type="application/octet-stream"
    )
