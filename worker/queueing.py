"""What runs a job on the broker: queue and task names, routing, and `enqueue`.

The one place that knows which task, queue and argument run a job of each kind (train: the
job id; consolidate: its consolidation run's id). Imports no torch and no app: `worker.app`
builds its routes from here and re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TRAIN_QUEUE = "train"
CONSOLIDATE_QUEUE = "consolidate"
# Light periodic work (the sweep, the consolidation policy): never waits behind a long job.
MAINTENANCE_QUEUE = "maintenance"
JOB_QUEUES = (TRAIN_QUEUE, CONSOLIDATE_QUEUE)

TRAIN_TASK = "diffbank.train"
CONSOLIDATE_TASK = "diffbank.consolidate"
SWEEP_TASK = "diffbank.sweep"
POLICY_TASK = "diffbank.consolidation_policy"

TASK_QUEUES = {
    TRAIN_TASK: TRAIN_QUEUE,
    CONSOLIDATE_TASK: CONSOLIDATE_QUEUE,
    SWEEP_TASK: MAINTENANCE_QUEUE,
    POLICY_TASK: MAINTENANCE_QUEUE,
}
MAINTENANCE_TASKS = (SWEEP_TASK, POLICY_TASK)
JOB_TASKS = {"train": TRAIN_TASK, "consolidate": CONSOLIDATE_TASK}
# kombu's Redis priority lists (its default steps); the sweep reads the same lists.
PRIORITY_STEPS = (0, 3, 6, 9)


@dataclass(frozen=True)
class JobMessage:
    """The broker message that runs one job: task name, its queue, its one argument."""

    task: str
    queue: str
    argument: int

    @property
    def ref(self) -> tuple[str, int]:
        """(task name, argument): how the sweep recognises the message in the broker."""
        return self.task, self.argument


def job_message(kind: str, *, job_id: int, run_id: int | None = None) -> JobMessage:
    """The message that runs a job of `kind` (a consolidate job needs its run's id)."""
    task = JOB_TASKS.get(kind)
    if task is None:
        raise ValueError(f"no task runs {kind!r} jobs")
    if task == CONSOLIDATE_TASK:
        if run_id is None:
            raise ValueError(f"consolidate job {job_id} needs its run id")
        return JobMessage(task, TASK_QUEUES[task], int(run_id))
    return JobMessage(task, TASK_QUEUES[task], int(job_id))


def fair_priority(jobs_ahead_of_tenant: int) -> int:
    """The broker priority of a tenant's next job: later the more of theirs are in flight.

    Redis serves priority 0 first, so one tenant's tenth job waits behind others' first.
    """
    return PRIORITY_STEPS[min(jobs_ahead_of_tenant, len(PRIORITY_STEPS) - 1)]


def enqueue(
    app: Any,
    kind: str,
    *,
    job_id: int,
    run_id: int | None = None,
    connection: Any = None,
    priority: int = 0,
) -> JobMessage:
    """Send the message that runs a job on `app` (routed by task name); the message sent."""
    message = job_message(kind, job_id=job_id, run_id=run_id)
    app.send_task(message.task, args=[message.argument], connection=connection, priority=priority)
    return message
