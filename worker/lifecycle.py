"""The life of one job on a worker, the same for training and consolidation runs.

`run_job` is the one skeleton: claim the job (compare-and-set), checkpoint it in the store's
mutable area, beat and poll for cancellation while the kind-specific work runs, map whatever
ended the work to one outcome, and record it. The job modules (`worker.diffprune.job`,
`worker.consolidation.job`) supply only the work. Also here: the outcomes, coded failures
and loading a job's data and base.
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

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from registry import catalog
from registry.db import get_session_factory
from registry.models import Dataset, Job
from registry.stores import ObjectStore, checkpoint_key, open_store
from settings import Settings
from worker.kit.progress import TrainingCancelled

log = logging.getLogger(__name__)

# Outcomes returned by run_training_job and run_consolidation (also logged by the Celery tasks).
NOT_CLAIMED = (
    "not-claimed"  # duplicate delivery, finished, cancelled while queued, or out of attempts
)
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
            if (
                catalog.record_progress(
                    session, job_id=self.job_id, worker_id=self.worker_id, progress=payload
                )
                is None
            ):
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
                    if (
                        catalog.heartbeat(session, job_id=self.job_id, worker_id=self.worker_id)
                        is None
                    ):
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


def _dataset_file(
    session: Session,
    store: ObjectStore,
    job: Job,
    dataset_id: int | None,
    directory: Path,
    stem: str,
) -> Path:
    """Fetch a dataset blob (sha256-verified) into `directory` as `<stem>.<format>`."""
    if dataset_id is None:
        raise JobFailure("dataset_missing", f"the job's {stem} dataset was deleted")
    try:
        dataset: Dataset = catalog.get_dataset(
            session, tenant_id=job.tenant_id, dataset_id=dataset_id
        )
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


def load_job_data(
    session: Session, store: ObjectStore, job: Job, settings: Settings, seed: int
) -> Any:
    """The job's `TaskData`: train (and validation) files from the store, parsed and validated."""
    from datasets_io.tabular import ColumnMapping, DatasetError, TableLimits
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


def load_job_base(name_or_path: str) -> Any:
    """The job's base encoder, loaded once per worker process."""
    from diffs.basemodel import load_base

    try:
        return load_base(name_or_path)
    except (OSError, ValueError) as exc:
        raise JobFailure("base_model_unavailable", f"base model {name_or_path!r}: {exc}") from exc


@dataclass
class ClaimedJob:
    """A job this worker claimed, with what its work needs: registry, store, checkpoint, monitor."""

    job: Job
    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    worker_id: str
    checkpoint: StoreCheckpointIO
    monitor: JobMonitor

    def stop_if_asked(self) -> None:
        """Raise `TrainingCancelled` once a cancel was requested or the job is no longer ours."""
        if self.monitor.should_stop():
            raise TrainingCancelled()

    def end(self, state: str, **fields: Any) -> bool:
        """Move the job, if still running for us, to a final state; False when it was not ours."""
        with self.sessions() as session:
            finished = catalog.finish_job(
                session, job_id=self.job.id, state=state, worker_id=self.worker_id, **fields
            )
        return finished is not None


# The kind-specific part of a job: the metrics to record as it succeeds, or None when the work
# already marked it succeeded itself (a training job, in the transaction publishing its version).
JobWork = Callable[[ClaimedJob], dict[str, Any] | None]


def failure_of(exc: BaseException, settings: Settings) -> tuple[str, str]:
    """(error code, message) recorded for a job that `exc` ended, for every kind of job."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return "time_limit", f"the job ran past its time limit ({settings.job_soft_time_limit_s}s)"
    if isinstance(exc, JobFailure):
        return exc.code, exc.message
    if isinstance(exc, catalog.CatalogError):
        return exc.code, str(exc)
    return "internal_error", f"{type(exc).__name__}: {exc}"


def run_job(job_id: int, *, kind: str, settings: Settings, work: JobWork) -> str:
    """Claim job `job_id`, run `work` on it under heartbeat and cancel polling; the outcome."""
    sessions = get_session_factory(settings)
    store = open_store(settings.store_url, settings)
    worker_id = worker_identity()
    with sessions() as session:
        job = catalog.claim_job(
            session,
            job_id=job_id,
            worker_id=worker_id,
            stale_after_s=settings.sweep_requeue_after_s,
        )
    if job is None:
        log.info("job %s not claimed (duplicate delivery, finished or out of attempts)", job_id)
        return NOT_CLAIMED
    checkpoint = StoreCheckpointIO(store, checkpoint_key(job_id))
    monitor = JobMonitor(
        sessions, job_id, worker_id, settings, attempt=job.attempts, checkpoint=checkpoint
    )
    claimed = ClaimedJob(job, settings, sessions, store, worker_id, checkpoint, monitor)
    log.info(
        "job %s claimed by %s (attempt %d/%d)", job_id, worker_id, job.attempts, job.max_attempts
    )
    try:
        with monitor.heartbeating():
            if job.kind != kind:
                raise JobFailure("wrong_job_kind", f"job {job_id} is a {job.kind} job, not {kind}")
            metrics = work(claimed)
            if metrics is not None and not claimed.end(SUCCEEDED, metrics=metrics):
                return LOST
    except (TrainingCancelled, JobLost):
        if monitor.lost or not claimed.end(CANCELLED):
            log.warning("job %s is no longer ours; leaving it to its new worker", job_id)
            return LOST
        checkpoint.remove()
        return CANCELLED
    except Exception as exc:
        code, message = failure_of(exc, settings)
        if code == "internal_error":
            log.exception("%s job %s failed", kind, job_id)
        log.warning("job %s failed: %s: %s", job_id, code, message)
        if not claimed.end(FAILED, error_code=code, error_message=message[:4000]):
            return LOST
        checkpoint.remove()
        return FAILED
    checkpoint.remove()
    log.info("job %s succeeded", job_id)
    return SUCCEEDED
