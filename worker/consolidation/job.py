"""The work of one consolidation run: load every task, fit, judge, publish, report.

Claiming, heartbeat, checkpoint, cancellation and failures are `worker.lifecycle.run_job`'s.

For each task the runner loads its active version's diff and the datasets of the training job
that produced the task (following `parent_version_id` through earlier consolidations), scores
the current version on its validation split ("before"), re-fits all tasks together
(`worker.consolidation.consolidate`), scores each composed diff ("after", built in memory) and
publishes a new version only for tasks within the run's tolerance. Lineage of a new version:
the run, the parent version, the shared artifact.

What is published is what the budget counts: the run's shared diff once, and per accepted task
only its residual (carrying head and metadata), which is the version's artifact; its composed
diff is built on request (`diffs.compose`). A current version of either layout is read as
the diff it stands for (`registry.layouts.version_diff`).

Write order per the registry: the shared diff blob is uploaded and verified and attached to the
run, then each accepted task's residual blob and its version row in one transaction. A resumed
run (worker died) skips tasks that already got their version from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from registry import catalog
from registry.db import get_session_factory
from registry.models import ConsolidationRun, Job, TaskVersion
from registry.stores import ObjectStore
from settings import Settings
from worker.consolidation.policy import stored_entries_of, total_stored_entries
from worker.lifecycle import (
    NOT_CLAIMED,
    ClaimedJob,
    JobFailure,
    load_job_base,
    load_job_data,
    run_job,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedTask:
    """A task as the runner sees it: its row, active version, current diff and data."""

    name: str
    task_id: int
    version: TaskVersion
    diff: Any  # SparseDiff: what the version stands for (composed for a consolidated one)
    data: Any  # TaskData
    stored_bytes: int = 0  # the version's own stored blob


def _training_job(session: Session, version: TaskVersion) -> Job:
    """The training job behind a version (through the parents of consolidated versions)."""
    with catalog.transaction(session):
        job = catalog.training_job_of(session, version)
    if job is None:
        raise JobFailure(
            "dataset_missing",
            f"version {version.number}: no training job (and so no dataset) behind it",
        )
    return job


def _load_tasks(
    session: Session, store: ObjectStore, run: ConsolidationRun, base: Any, settings: Settings
) -> list[LoadedTask]:
    """Every task of the run with its active version's diff and its training data."""
    from diffs.types import ArtifactError
    from registry.layouts import version_diff
    from registry.stores import ObjectIntegrityError, ObjectNotFound

    loaded = []
    for name in run.task_names:
        try:
            task = catalog.get_task(session, tenant_id=run.tenant_id, name=name)
            version = catalog.get_task_version(session, tenant_id=run.tenant_id, name=name)
        except catalog.NotFoundError as exc:
            raise JobFailure("task_missing", str(exc)) from exc
        try:
            diff = version_diff(
                store, version, expected_fingerprint=base.fingerprint, base_shapes=base.shapes
            )
        except (ObjectNotFound, ObjectIntegrityError, ArtifactError) as exc:
            raise JobFailure("artifact_unreadable", f"task {name!r}: {exc}") from exc
        job = _training_job(session, version)
        seed = int((job.params or {}).get("seed", 0))
        try:
            data = load_job_data(session, store, job, settings, seed=seed)
        except JobFailure as exc:
            raise JobFailure(exc.code, f"task {name!r}: {exc.message}") from exc
        loaded.append(
            LoadedTask(name, task.id, version, diff, data, int(version.artifact.size_bytes))
        )
    return loaded


def _download_bytes(task: LoadedTask) -> int:
    """Artifact bytes of a task's current diff as downloaded: recorded, else serialised once."""
    from diffs.write import dumps_artifact
    from registry.layouts import download_digest

    digest = download_digest(task.version)
    return digest.size_bytes if digest is not None else len(dumps_artifact(task.diff))


def _config_for(
    run: ConsolidationRun, job: Job, tasks: list[LoadedTask], settings: Settings
) -> Any:
    """The run's ConsolidationConfig: job params over defaults, budget in stored entries."""
    from worker.consolidation.config import ConsolidationConfig
    from worker.device import select_device

    values = dict(job.params or {})
    values.update(
        strategy=run.strategy,
        tolerance=run.tolerance,
        budget=_budget_entries(run, tasks),
        checkpoint_every=settings.checkpoint_every_steps,
        device=select_device(settings),
    )
    return ConsolidationConfig.from_dict(values)


def _budget_entries(run: ConsolidationRun, tasks: list[LoadedTask]) -> int:
    """The budget in stored entries; a bytes budget is converted with the current bytes per entry."""
    if run.budget_kind == "nnz":
        return int(run.budget)
    entries = sum(t.diff.nnz for t in tasks)
    size = sum(_download_bytes(t) for t in tasks)
    bytes_per_entry = size / max(1, entries)
    return max(1, int(run.budget // bytes_per_entry))


def _published_by_run(session: Session, run: ConsolidationRun, name: str) -> TaskVersion | None:
    """The version this run already published for a task (resumed runs), if any."""
    versions = catalog.list_task_versions(session, tenant_id=run.tenant_id, name=name)
    return next((v for v in versions if v.consolidation_run_id == run.id), None)


def stored_blobs(result: Any) -> dict[str, bytes]:
    """What a run may publish, serialised once: the shared diff under "" and each residual."""
    from diffs.write import dumps_artifact

    blobs = {"": dumps_artifact(result.shared)}
    blobs.update({o.name: dumps_artifact(o.residual) for o in result.tasks})
    return blobs


def _publish(
    sessions: sessionmaker[Session],
    store: ObjectStore,
    run: ConsolidationRun,
    tasks: list[LoadedTask],
    result: Any,
    rows: list[dict[str, Any]],
    blobs: dict[str, bytes],
) -> int | None:
    """Shared blob → run, then each accepted task's residual version; the shared artifact id."""
    from registry.publish import publish_consolidated_version, publish_shared_diff

    accepted = [row for row in rows if row["accepted"]]
    if not accepted:
        return None
    shared_bytes: bytes | None = blobs[""]
    with sessions() as session:
        shared_id = catalog.load_consolidation_run(session, run_id=run.id).shared_artifact_id
        if shared_id is None:
            shared_id = publish_shared_diff(session, store, run_id=run.id, data=blobs[""])
        else:  # a resumed run keeps the shared artifact it already published, read from the store
            shared_bytes = None
    outcomes = {o.name: o for o in result.tasks}
    for task, row in zip(tasks, rows, strict=True):
        if not row["accepted"]:
            continue
        outcome = outcomes[task.name]
        with sessions() as session:
            existing = _published_by_run(session, run, task.name)
            if existing is None:
                existing = publish_consolidated_version(
                    session,
                    store,
                    task_id=task.task_id,
                    residual_bytes=blobs[task.name],
                    shared_artifact_id=shared_id,
                    shared_bytes=shared_bytes,
                    nnz=outcome.composed.nnz,
                    density=float(outcome.composed.meta.density),
                    metrics=row["metrics_after"],
                    config={
                        "consolidation": result.config.to_dict(),
                        "run_id": run.id,
                        "stored_entries": outcome.nnz,
                        "shared_stored_entries": result.shared_nnz,
                    },
                    consolidation_run_id=run.id,
                    parent_version_id=task.version.id,
                )
        row["version_after"] = existing.number
    return shared_id


def _report(
    run: ConsolidationRun,
    config: Any,
    tasks: list[LoadedTask],
    result: Any,
    before: list[dict],
    after: list[dict],
    blobs: dict[str, bytes],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run report and its per-task rows (accepted by the tolerance rule).

    `bytes` of a row is what the task stores (its residual blob); the shared blob's bytes and
    entries are reported once. `published_entries` / `published_bytes` sum every blob the run
    publishes (the shared one once, if any task is accepted): entries are at most the budget.
    """
    from worker.consolidation.config import accept

    outcomes = {o.name: o for o in result.tasks}
    rows = []
    for task, metrics_before, metrics_after in zip(tasks, before, after, strict=True):
        outcome = outcomes[task.name]
        own, _, _ = stored_entries_of(task.version)
        rows.append(
            {
                "task": task.name,
                "metric_name": metrics_after["metric_name"],
                "metric_before": metrics_before["metric"],
                "metric_after": metrics_after["metric"],
                "metrics_before": metrics_before,
                "metrics_after": metrics_after,
                "version_before": task.version.number,
                "version_after": None,
                "nnz_before": own,
                "nnz": outcome.nnz,
                "stored_entries": outcome.residual.nnz,
                "composed_nnz": outcome.composed.nnz,
                "bytes_before": task.stored_bytes,
                "bytes": len(blobs[task.name]),
                "accepted": accept(
                    metrics_before["metric"], metrics_after["metric"], run.tolerance
                ),
            }
        )
    accepted = [row for row in rows if row["accepted"]]
    shared_published = bool(accepted)
    report = {
        "strategy": config.strategy,
        "budget": int(run.budget),
        "budget_kind": run.budget_kind,
        "budget_entries": config.budget,
        "tolerance": run.tolerance,
        "config": config.to_dict(),
        "shared_nnz": result.shared_nnz,
        "shared_bytes": len(blobs[""]),
        "published_entries": (result.shared.nnz if shared_published else 0)
        + sum(row["stored_entries"] for row in accepted),
        "published_bytes": (len(blobs[""]) if shared_published else 0)
        + sum(row["bytes"] for row in accepted),
        "fitted_nnz": result.total_nnz,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 3),
        "tasks": rows,
    }
    return report, rows


def _total_after(rows: list[dict[str, Any]], shared_nnz: int, tasks: list[LoadedTask]) -> int:
    """What stays stored for these tasks: the shared part if used, new residuals, kept old versions."""
    any_accepted = any(r["accepted"] for r in rows)
    kept = [t.version for t, r in zip(tasks, rows, strict=True) if not r["accepted"]]
    new = sum(r["nnz"] for r in rows if r["accepted"])
    return (shared_nnz if any_accepted else 0) + new + total_stored_entries(kept)


def _consolidate(run: ConsolidationRun, claimed: ClaimedJob) -> dict[str, Any]:
    """Fit the run's tasks together, publish the accepted ones, record the report; its summary."""
    from worker.consolidation.config import ConsolidationError

    try:
        return _fit_and_publish(run, claimed)
    except ConsolidationError as exc:
        raise JobFailure(getattr(exc, "code", "invalid_request"), str(exc)) from exc


def _fit_and_publish(run: ConsolidationRun, claimed: ClaimedJob) -> dict[str, Any]:
    """The body of `_consolidate`: load, score before, re-fit, score after, publish, report."""
    from worker.consolidation.artifacts import evaluate_diff
    from worker.consolidation.config import ConsolidationTask
    from worker.consolidation.fit import consolidate
    from worker.kit.progress import Progress

    sessions, store, settings = claimed.sessions, claimed.store, claimed.settings
    monitor = claimed.monitor
    base = load_job_base(_base_source(sessions, run.base_model))
    with sessions() as session:
        tasks = _load_tasks(session, store, run, base, settings)
    config = _config_for(run, claimed.job, tasks, settings)
    before = [evaluate_diff(t.diff, t.data, base=base, config=config) for t in tasks]
    result = consolidate(
        [ConsolidationTask(t.name, t.data, t.diff) for t in tasks],
        config,
        base=base,
        run_id=run.id,
        progress=monitor.progress,
        checkpoint=claimed.checkpoint,
        should_stop=monitor.should_stop,
    )
    after = [
        evaluate_diff(o.composed, t.data, base=base, config=config)
        for o, t in zip(result.tasks, tasks, strict=True)
    ]
    monitor.progress(Progress(result.steps, result.steps, 0.0, result.total_nnz, "evaluate"))
    claimed.stop_if_asked()
    blobs = stored_blobs(result)
    report, rows = _report(run, config, tasks, result, before, after, blobs)
    shared_id = _publish(sessions, store, run, tasks, result, rows, blobs)
    report["shared_artifact_id"] = shared_id
    total_before = total_stored_entries([t.version for t in tasks])
    total_after = _total_after(rows, result.shared_nnz, tasks)
    report["total_nnz_before"], report["total_nnz_after"] = total_before, total_after
    with sessions() as session:
        catalog.record_report(
            session,
            run_id=run.id,
            report=report,
            total_nnz_before=total_before,
            total_nnz_after=total_after,
        )
    return {
        "accepted": sum(r["accepted"] for r in rows),
        "tasks": len(rows),
        "total_nnz_before": total_before,
        "total_nnz_after": total_after,
    }


def run_consolidation(run_id: int, *, settings: Settings) -> str:
    """Claim and run consolidation run `run_id`; the outcome (`worker.lifecycle` constants)."""
    with get_session_factory(settings)() as session:
        run = catalog.load_consolidation_run(session, run_id=run_id)
    if run is None:
        log.warning("consolidation run %s does not exist", run_id)
        return NOT_CLAIMED
    return run_job(
        run.job_id, kind="consolidate", settings=settings, work=partial(_consolidate, run)
    )


def _base_source(sessions: sessionmaker[Session], name: str) -> str:
    """Where to load a registered base model from (its recorded source), else the name itself."""
    with sessions() as session:
        try:
            return catalog.get_base_model(session, name=name).source or name
        except catalog.NotFoundError:
            return name
