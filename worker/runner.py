"""Run one training job end to end: claim it, load its data, train, publish, record the outcome.

The SQL registry is the source of truth. A duplicate or late delivery finds the job already
claimed (or finished) and does nothing; a delivery after a worker died resumes from the job's
checkpoint in the store's mutable area; the version is published in the same transaction that
marks the job succeeded, so a job publishes at most one version.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from registry import catalog
from registry.db import get_session_factory
from registry.models import Dataset, Job
from registry.settings import Settings
from registry.stores import ObjectStore, checkpoint_key, open_store

log = logging.getLogger(__name__)

# Outcomes returned by run_training_job (also logged by the Celery task).
NOT_CLAIMED = "not-claimed"  # duplicate delivery, finished, cancelled while queued, or out of attempts
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
LOST = "lost"  # another worker took the job over (ours was presumed dead); leave it alone


class JobFailure(Exception):
    """A reason a job cannot succeed, with a machine-readable code for the job row."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobLost(Exception):
    """The job is no longer running for this worker (the registry says so)."""


def worker_identity() -> str:
    """This process's worker id: host and pid (unique among live workers)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class StoreCheckpointIO:
    """The trainer's `CheckpointIO`, backed by the object store's mutable checkpoint area."""

    store: ObjectStore
    key: str
    resumed: bool = False  # load() found a checkpoint
    saves: int = 0

    def load(self) -> bytes | None:
        """The job's last checkpoint, or None."""
        data = self.store.get_mutable(self.key)
        self.resumed = data is not None
        return data

    def save(self, data: bytes) -> None:
        """Overwrite the job's checkpoint."""
        self.store.put_mutable(self.key, data)
        self.saves += 1

    def remove(self) -> None:
        """Delete the checkpoint (the job finished; nothing will resume it)."""
        self.store.delete(self.key)


@dataclass
class JobMonitor:
    """The trainer's link to the registry: throttled progress, cancel polling, a heartbeat thread."""

    sessions: sessionmaker[Session]
    job_id: int
    worker_id: str
    settings: Settings
    attempt: int = 1
    checkpoint: StoreCheckpointIO | None = None
    clock: Callable[[], float] = time.monotonic
    lost: bool = False
    cancel_requested: bool = False
    _last_progress_at: float = field(default=float("-inf"), repr=False)
    _last_phase: str | None = field(default=None, repr=False)
    _last_poll_at: float = field(default=float("-inf"), repr=False)
    _stop_beating: threading.Event = field(default_factory=threading.Event, repr=False)

    def progress(self, report: Any) -> None:
        """Store a trainer `Progress` (first, per phase change, last, else at most once per interval)."""
        now = self.clock()
        due = (
            now - self._last_progress_at >= self.settings.job_progress_interval_s
            or report.phase != self._last_phase
            or report.step >= report.total_steps
        )
        if not due or self.lost:
            return
        self._last_progress_at, self._last_phase = now, report.phase
        payload = {
            "step": int(report.step),
            "total_steps": int(report.total_steps),
            "loss": float(report.loss),
            "expected_nnz": float(report.expected_nnz),
            "phase": report.phase,
            "attempt": self.attempt,
            "resumed": bool(self.checkpoint and self.checkpoint.resumed),
        }
        with self.sessions() as session:
            if catalog.record_progress(
                session, job_id=self.job_id, worker_id=self.worker_id, progress=payload
            ) is None:
                self.lost = True

    def should_stop(self) -> bool:
        """True once a cancel was requested or the job stopped being ours (read ~once per poll)."""
        if self.lost or self.cancel_requested:
            return True
        now = self.clock()
        if now - self._last_poll_at < self.settings.job_cancel_poll_s:
            return False
        self._last_poll_at = now
        with self.sessions() as session:
            job = catalog.load_job(session, job_id=self.job_id)
        if job is None or job.state != "running" or job.worker_id != self.worker_id:
            self.lost = True
        elif job.cancel_requested:
            self.cancel_requested = True
        return self.lost or self.cancel_requested

    def _beat_forever(self) -> None:
        while not self._stop_beating.wait(self.settings.job_heartbeat_interval_s):
            try:
                with self.sessions() as session:
                    if catalog.heartbeat(session, job_id=self.job_id, worker_id=self.worker_id) is None:
                        self.lost = True
                        return
            except Exception:  # a DB hiccup must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    @contextmanager
    def heartbeating(self) -> Iterator[None]:
        """Beat in a background thread while the body runs (data loading, training, eval)."""
        thread = threading.Thread(
            target=self._beat_forever, name=f"heartbeat-job-{self.job_id}", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            self._stop_beating.set()
            thread.join(timeout=5)


def _dataset_file(session: Session, store: ObjectStore, job: Job, dataset_id: int | None,
                  directory: Path, stem: str) -> Path:
    """Fetch a dataset blob (sha256-verified) into `directory` as `<stem>.<format>`."""
    if dataset_id is None:
        raise JobFailure("dataset_missing", f"the job's {stem} dataset was deleted")
    try:
        dataset: Dataset = catalog.get_dataset(session, tenant_id=job.tenant_id, dataset_id=dataset_id)
    except catalog.NotFoundError as exc:
        raise JobFailure("dataset_missing", f"{stem} dataset {dataset_id} not found") from exc
    from registry.stores import ObjectIntegrityError, ObjectNotFound

    try:
        data = store.get(dataset.artifact.object_key, sha256=dataset.artifact.sha256)
    except ObjectNotFound as exc:
        raise JobFailure(
            "dataset_missing", f"{stem} dataset {dataset_id}: its stored file is missing ({exc})"
        ) from exc
    except ObjectIntegrityError as exc:
        raise JobFailure("dataset_corrupt", f"{stem} dataset {dataset_id}: {exc}") from exc
    path = directory / f"{stem}.{dataset.format}"
    path.write_bytes(data)
    return path


def _load_data(session: Session, store: ObjectStore, job: Job, settings: Settings, seed: int) -> Any:
    """The job's `TaskData`: train (and validation) files from the store, parsed and validated."""
    from registry.tabular import ColumnMapping, DatasetError, TableLimits
    from worker.data import load_task_data

    with tempfile.TemporaryDirectory(prefix=f"diffbank-job-{job.id}-") as tmp:
        directory = Path(tmp)
        train_path = _dataset_file(session, store, job, job.dataset_id, directory, "train")
        validation_path = None
        if job.validation_dataset_id is not None:
            validation_path = _dataset_file(
                session, store, job, job.validation_dataset_id, directory, "validation"
            )
        dataset = catalog.get_dataset(session, tenant_id=job.tenant_id, dataset_id=job.dataset_id)
        try:
            return load_task_data(
                train_path,
                mapping=ColumnMapping(**dataset.column_mapping),
                task_type=dataset.task_type,
                validation_path=validation_path,
                seed=seed,
                limits=TableLimits.from_settings(settings),
            )
        except DatasetError as exc:
            raise JobFailure("invalid_dataset", str(exc)) from exc


def _config_for(job: Job, settings: Settings) -> Any:
    """The job's `DiffPruneConfig`: its params over the trainer defaults, plus worker knobs."""
    from worker.config import DiffPruneConfig
    from worker.device import select_device

    values = dict(job.params or {})
    values["checkpoint_every"] = settings.checkpoint_every_steps
    values["device"] = select_device(settings)
    try:
        return DiffPruneConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise JobFailure("invalid_params", f"job parameters: {exc}") from exc


def _load_base(name_or_path: str) -> Any:
    """The job's base encoder, loaded once per worker process."""
    from registry.basemodel import load_base

    try:
        return load_base(name_or_path)
    except (OSError, ValueError) as exc:
        raise JobFailure("base_model_unavailable", f"base model {name_or_path!r}: {exc}") from exc


def _publish(session: Session, store: ObjectStore, job: Job, *, worker_id: str, base: Any,
             data: Any, config: Any, result: Any) -> int:
    """Write order: diff blob → verify → one transaction (version + job succeeded). Version id."""
    from registry.artifact import dumps_artifact
    from registry.publish import publish_version

    base_row = catalog.register_base_model(
        session, name=base.name, source=job.base_model, fingerprint=base.fingerprint,
        n_params=base.n_params,
    )
    task = catalog.get_or_create_task(
        session, tenant_id=job.tenant_id, name=job.task_name, base_model_id=base_row.id,
        task_type=data.task_type, label_names=list(data.label_names),
    )
    metrics = dict(result.metrics)
    metrics["train_seconds"] = round(float(result.train_seconds), 3)
    metrics["peak_memory_bytes"] = int(result.peak_memory_bytes)
    try:
        version = publish_version(
            session, store, task_id=task.id, diff_bytes=dumps_artifact(result.diff),
            nnz=result.diff.nnz, density=float(result.diff.meta.density), metrics=metrics,
            config=config.to_dict(), source_job_id=job.id, label_names=list(data.label_names),
            finish_job_id=job.id, worker_id=worker_id,
        )
    except catalog.ConflictError as exc:
        if exc.code == "job_not_running":
            raise JobLost(str(exc)) from exc
        raise
    return version.id


def _finish(sessions: sessionmaker[Session], job_id: int, worker_id: str, state: str,
            **fields: Any) -> bool:
    """Move our running job to a final state; False when it was not ours any more."""
    with sessions() as session:
        return catalog.finish_job(
            session, job_id=job_id, state=state, worker_id=worker_id, **fields
        ) is not None


def run_training_job(job_id: int, *, settings: Settings) -> str:
    """Claim, train and publish job `job_id`; returns the outcome (see the module constants)."""
    from worker.trainer import TrainingCancelled, train_diff

    sessions = get_session_factory(settings)
    store = open_store(settings.store_url, settings)
    worker_id = worker_identity()
    with sessions() as session:
        job = catalog.claim_job(
            session, job_id=job_id, worker_id=worker_id, stale_after_s=settings.sweep_requeue_after_s
        )
    if job is None:
        log.info("job %s not claimed (duplicate delivery, finished or out of attempts)", job_id)
        return NOT_CLAIMED
    checkpoint = StoreCheckpointIO(store, checkpoint_key(job_id))
    monitor = JobMonitor(sessions, job_id, worker_id, settings, attempt=job.attempts,
                         checkpoint=checkpoint)
    log.info("job %s claimed by %s (attempt %d/%d)", job_id, worker_id, job.attempts, job.max_attempts)
    try:
        with monitor.heartbeating():
            if job.kind != "train":
                raise JobFailure("wrong_job_kind", f"job {job_id} is a {job.kind} job, not train")
            config = _config_for(job, settings)
            with sessions() as session:
                data = _load_data(session, store, job, settings, seed=config.seed)
            base = _load_base(job.base_model)
            result = train_diff(data, config, base=base, progress=monitor.progress,
                                checkpoint=checkpoint, should_stop=monitor.should_stop)
            if monitor.should_stop():
                raise TrainingCancelled()
            with sessions() as session:
                _publish(session, store, job, worker_id=worker_id, base=base, data=data,
                         config=config, result=result)
    except (TrainingCancelled, JobLost):
        if monitor.lost or not _finish(sessions, job_id, worker_id, CANCELLED):
            log.warning("job %s is no longer ours; leaving it to its new worker", job_id)
            return LOST
        checkpoint.remove()
        return CANCELLED
    except JobFailure as exc:
        return _fail(sessions, checkpoint, job_id, worker_id, exc.code, exc.message)
    except catalog.CatalogError as exc:
        return _fail(sessions, checkpoint, job_id, worker_id, exc.code, str(exc))
    except Exception as exc:
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            return _fail(sessions, checkpoint, job_id, worker_id, "time_limit",
                         f"the job ran past its time limit ({settings.job_soft_time_limit_s}s)")
        log.exception("job %s failed", job_id)
        return _fail(sessions, checkpoint, job_id, worker_id, "internal_error",
                     f"{type(exc).__name__}: {exc}")
    checkpoint.remove()
    log.info("job %s succeeded", job_id)
    return SUCCEEDED


def _fail(sessions: sessionmaker[Session], checkpoint: StoreCheckpointIO, job_id: int,
          worker_id: str, code: str, message: str) -> str:
    """Record a failure (if the job is still ours) and drop its checkpoint."""
    log.warning("job %s failed: %s: %s", job_id, code, message)
    if not _finish(sessions, job_id, worker_id, FAILED, error_code=code, error_message=message[:4000]):
        return LOST
    checkpoint.remove()
    return FAILED
