"""Consolidation runs: a multitask re-prune of several tasks under one budget, one job each."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.catalog._ids import get_row, in_id_range
from registry.catalog._tx import transaction
from registry.catalog.artifacts import add_artifact
from registry.catalog.errors import ConflictError, InvalidInputError, NotFoundError
from registry.catalog.jobs import insert_job
from registry.catalog.pagination import paginate
from registry.catalog.tasks import check_task_name
from registry.models import Artifact, BaseModel, ConsolidationRun, Job, Task, TaskVersion
from registry.stores.base import StoredObject

# Trained strategies re-fit the tasks; merge strategies combine their current diffs without training.
TRAINED_STRATEGIES = ("elementwise", "rank")
MERGE_STRATEGIES = ("ties", "dare", "task_arithmetic")
STRATEGIES = TRAINED_STRATEGIES + MERGE_STRATEGIES
BUDGET_KINDS = ("nnz", "bytes")
TRIGGERS = ("api", "schedule")


def create_consolidation_run(
    session: Session,
    *,
    tenant_id: int,
    base_model: str,
    budget: int,
    task_names: list[str] | None = None,
    strategy: str = "elementwise",
    budget_kind: str = "nnz",
    tolerance: float = 0.5,
    trigger: str = "api",
    params: dict[str, Any] | None = None,
    max_attempts: int = 3,
) -> ConsolidationRun:
    """A run and its queued 'consolidate' job in one transaction.

    `task_names` None means every task of the tenant on `base_model` with an active version;
    named tasks must exist on that base and have an active version.
    """
    if strategy not in STRATEGIES:
        raise InvalidInputError(
            f"strategy must be one of {', '.join(STRATEGIES)}", field="strategy"
        )
    if budget_kind not in BUDGET_KINDS:
        raise InvalidInputError(
            f"budget_kind must be one of {', '.join(BUDGET_KINDS)}", field="budget_kind"
        )
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInputError("budget must be a positive integer", field="budget")
    if not tolerance >= 0:
        raise InvalidInputError("tolerance must be >= 0", field="tolerance")
    if trigger not in TRIGGERS:
        raise InvalidInputError(f"trigger must be one of {', '.join(TRIGGERS)}", field="trigger")
    with transaction(session):
        tasks = _resolve_tasks(session, tenant_id, base_model, task_names)
        for task in tasks:
            _check_training_data(session, task)
        names = [t.name for t in tasks]
        _check_no_run_in_flight(session, tenant_id, base_model, names)
        job = insert_job(
            session,
            tenant_id=tenant_id,
            kind="consolidate",
            base_model=base_model,
            params=dict(params or {}),
            max_attempts=max_attempts,
        )
        run = ConsolidationRun(
            job_id=job.id,
            tenant_id=tenant_id,
            base_model=base_model,
            strategy=strategy,
            budget=budget,
            budget_kind=budget_kind,
            tolerance=float(tolerance),
            task_names=names,
            report={},
            trigger=trigger,
        )
        session.add(run)
        session.flush()
        session.refresh(run)
    return run


def training_job_of(session: Session, version: TaskVersion) -> Job | None:
    """The training job behind a version (through the parents of consolidated versions)."""
    seen: set[int] = set()
    current: TaskVersion | None = version
    while current is not None and current.id not in seen:
        seen.add(current.id)
        if current.source_job_id is not None:
            job = session.get(Job, current.source_job_id)
            if job is not None and job.kind == "train":
                return job
        if current.parent_version_id is None:
            return None
        current = session.get(TaskVersion, current.parent_version_id)
    return None


def _runs_in_flight(tenant_id: int, base_model: str):
    """The query of a tenant's queued or running consolidations on one base."""
    return (
        select(ConsolidationRun)
        .join(Job, ConsolidationRun.job_id == Job.id)
        .where(
            ConsolidationRun.tenant_id == tenant_id,
            ConsolidationRun.base_model == base_model,
            Job.state.in_(("queued", "running")),
        )
    )


def _check_no_run_in_flight(
    session: Session, tenant_id: int, base_model: str, names: list[str]
) -> None:
    """One run at a time per task: a second run over a task still being consolidated is 409."""
    for run in session.scalars(_runs_in_flight(tenant_id, base_model)):
        shared = sorted(set(run.task_names) & set(names))
        if shared:
            raise ConflictError(
                f"consolidation run {run.id} over task {shared[0]!r} is still queued or "
                "running; wait for it or cancel it",
                field="tasks",
                code="consolidation_in_flight",
            )


def _check_training_data(session: Session, task: Task) -> None:
    """A consolidation re-trains on each task's training rows: they must still be there."""
    version = session.scalar(
        select(TaskVersion).where(
            TaskVersion.task_id == task.id, TaskVersion.number == task.active_version
        )
    )
    job = None if version is None else training_job_of(session, version)
    # A deleted dataset leaves its jobs' dataset_id NULL; a version published without a job
    # of ours (job None) is reported by the run itself, by task name.
    if job is not None and job.dataset_id is None:
        raise InvalidInputError(
            f"task {task.name!r}: its training dataset was deleted (job {job.id} trained on "
            "it); upload it again and retrain the task first",
            field="tasks",
        )


def _resolve_tasks(
    session: Session, tenant_id: int, base_model: str, task_names: list[str] | None
) -> list[Task]:
    query = (
        select(Task)
        .join(BaseModel, Task.base_model_id == BaseModel.id)
        .where(Task.tenant_id == tenant_id, BaseModel.name == base_model)
    )
    if task_names is None:
        tasks = [t for t in session.scalars(query.order_by(Task.name)) if t.active_version]
        if not tasks:
            raise InvalidInputError(
                f"no task with a published version on base model {base_model!r}", field="tasks"
            )
        return tasks
    names = [check_task_name(n) for n in task_names]
    if not names:
        raise InvalidInputError("tasks must name at least one task", field="tasks")
    if len(set(names)) != len(names):
        raise InvalidInputError("tasks must not repeat a task", field="tasks")
    found = {t.name: t for t in session.scalars(query.where(Task.name.in_(names)))}
    for name in names:
        if name not in found:
            raise NotFoundError(
                f"task {name!r} not found on base model {base_model!r}", field="tasks"
            )
        if found[name].active_version is None:
            raise InvalidInputError(f"task {name!r} has no published version", field="tasks")
    return [found[n] for n in names]


def get_consolidation_run(session: Session, *, tenant_id: int, run_id: int) -> ConsolidationRun:
    """The tenant's consolidation run `run_id`, or NotFoundError."""
    with transaction(session):
        run = get_row(session, ConsolidationRun, run_id, populate_existing=True)
    if run is None or run.tenant_id != tenant_id:
        raise NotFoundError(f"consolidation run {run_id} not found", field="run_id")
    return run


def load_consolidation_run(session: Session, *, run_id: int) -> ConsolidationRun | None:
    """Run `run_id` whatever its tenant (for workers), or None."""
    with transaction(session):
        return get_row(session, ConsolidationRun, run_id, populate_existing=True)


def get_consolidation_run_for_job(session: Session, *, job_id: int) -> ConsolidationRun | None:
    """The run a 'consolidate' job belongs to, or None."""
    if not in_id_range(job_id):
        return None
    with transaction(session):
        return session.scalar(select(ConsolidationRun).where(ConsolidationRun.job_id == job_id))


def list_consolidation_runs(
    session: Session, *, tenant_id: int, cursor: str | None = None, limit: int = 50
) -> tuple[list[ConsolidationRun], str | None]:
    """A page of the tenant's consolidation runs, newest first."""
    with transaction(session):
        query = select(ConsolidationRun).where(ConsolidationRun.tenant_id == tenant_id)
        return paginate(session, query, ConsolidationRun.id, cursor=cursor, limit=limit)


def set_shared_artifact(session: Session, *, run_id: int, stored: StoredObject) -> Artifact:
    """Insert the artifact of an uploaded, verified shared diff and attach it to the run."""
    with transaction(session):
        run = get_row(session, ConsolidationRun, run_id)
        if run is None:
            raise NotFoundError(f"consolidation run {run_id} not found", field="run_id")
        artifact = add_artifact(session, stored=stored, kind="shared-diff")
        run.shared_artifact_id = artifact.id
    return artifact


def record_report(
    session: Session,
    *,
    run_id: int,
    report: dict[str, Any],
    total_nnz_before: int | None = None,
    total_nnz_after: int | None = None,
) -> ConsolidationRun:
    """Store a run's report (per-task metrics before/after, acceptance) and nnz totals."""
    with transaction(session):
        run = get_row(session, ConsolidationRun, run_id)
        if run is None:
            raise NotFoundError(f"consolidation run {run_id} not found", field="run_id")
        run.report = dict(report)
        if total_nnz_before is not None:
            run.total_nnz_before = int(total_nnz_before)
        if total_nnz_after is not None:
            run.total_nnz_after = int(total_nnz_after)
    return run


def tasks_in_flight(session: Session, *, tenant_id: int, base_model: str) -> set[str]:
    """Names of the tenant's tasks on `base_model` in a queued or running consolidation."""
    with transaction(session):
        runs = session.scalars(_runs_in_flight(tenant_id, base_model)).all()
        return {name for run in runs for name in run.task_names}
