"""Request and response bodies of the HTTP API, one family per entity."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

TaskName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
]
TaskType = Literal["classification", "pair-classification", "regression"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["train", "consolidate"]


class ErrorDetail(BaseModel):
    """What went wrong: a stable code, a readable message, the offending field if any."""

    code: str
    message: str
    field: str | None = None


class ErrorPublic(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting the JSON error body for each status."""
    return {status: {"model": ErrorPublic} for status in statuses}


ROUTE_ERRORS = error_responses(401, 403, 404, 409, 422)


# -- datasets ---------------------------------------------------------------------------


class DatasetPublic(BaseModel):
    """An uploaded, validated dataset."""

    id: int
    filename: str
    format: str
    sha256: str
    size_bytes: int
    rows: int
    labels: list[str]
    task_type: TaskType
    text_field: str
    text_pair_field: str | None = None
    label_field: str
    created_at: datetime | None = None


class DatasetsPublic(BaseModel):
    """A page of datasets."""

    items: list[DatasetPublic]
    next_cursor: str | None = None


# -- jobs -------------------------------------------------------------------------------


class JobCreate(BaseModel):
    """A training job: learn a sparse diff for `task` from `dataset_id`. Unset knobs use defaults."""

    model_config = ConfigDict(extra="forbid")

    task: TaskName
    dataset_id: int = Field(ge=1)
    validation_dataset_id: int | None = Field(default=None, ge=1)
    base_model: str | None = Field(default=None, min_length=1, max_length=512)
    density: float | None = Field(default=None, gt=0.0, lt=1.0)
    epochs: int | None = Field(default=None, ge=1, le=100)
    fix_epochs: int | None = Field(default=None, ge=0, le=100)
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    lr: float | None = Field(default=None, gt=0.0, le=1.0)
    fix_lr: float | None = Field(default=None, gt=0.0, le=1.0)
    max_length: int | None = Field(default=None, ge=8, le=512)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)

    @field_validator("base_model")
    @classmethod
    def _base_model_is_text(cls, value: str | None) -> str | None:
        if value is not None:
            if any(ord(ch) < 32 for ch in value):
                raise ValueError("must not contain control characters")
            value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (a ValueError)
        return value

    def params(self) -> dict[str, Any]:
        """The hyperparameters the user set (others keep the trainer's defaults)."""
        knobs = self.model_dump(
            exclude={"task", "dataset_id", "validation_dataset_id", "base_model"}, exclude_none=True
        )
        return dict(sorted(knobs.items()))


class JobProgressPublic(BaseModel):
    """Where a running job is."""

    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    expected_nnz: float | None = None
    phase: str | None = None


class JobErrorPublic(BaseModel):
    """Why a job failed."""

    code: str | None = None
    message: str | None = None


class JobPublic(BaseModel):
    """A job and its state."""

    id: int
    kind: JobKind
    state: JobState
    task: str | None = None
    dataset_id: int | None = None
    validation_dataset_id: int | None = None
    base_model: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 0
    cancel_requested: bool = False
    progress: JobProgressPublic = Field(default_factory=JobProgressPublic)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: JobErrorPublic | None = None
    version: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobsPublic(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobPublic]
    next_cursor: str | None = None


class JobEventPublic(BaseModel):
    """One state change or progress report of a job."""

    seq: int
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None


class JobEventsPublic(BaseModel):
    """Events of a job after a given sequence number, oldest first."""

    items: list[JobEventPublic]


# -- tasks ------------------------------------------------------------------------------


class TaskPublic(BaseModel):
    """A task: a name on one base model with versions of its diff."""

    name: str
    base_model: str
    task_type: TaskType
    label_names: list[str] = Field(default_factory=list)
    active_version: int | None = None
    created_at: datetime | None = None


class TasksPublic(BaseModel):
    """A page of tasks."""

    items: list[TaskPublic]
    next_cursor: str | None = None


class LineagePublic(BaseModel):
    """Where a task version came from."""

    source_job_id: int | None = None
    consolidation_run_id: int | None = None
    parent_version: int | None = None


class TaskVersionPublic(BaseModel):
    """One published version of a task's diff."""

    number: int
    active: bool = False
    nnz: int | None = None
    density: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    sha256: str | None = None
    size_bytes: int | None = None
    lineage: LineagePublic = Field(default_factory=LineagePublic)
    created_at: datetime | None = None


class TaskVersionsPublic(BaseModel):
    """Every version of a task, oldest first."""

    items: list[TaskVersionPublic]


class TaskStatsPublic(BaseModel):
    """Where a version's nonzeros sit."""

    task: str
    version: int
    nnz: int
    n_params: int
    density: float
    nonzeros_per_layer: dict[str, int]


# -- predictions ------------------------------------------------------------------------

PairInput = Annotated[list[str], Field(min_length=2, max_length=2)]


class PredictRequest(BaseModel):
    """Texts, or `[text, text_pair]` pairs, to predict with a task's diff."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] | list[PairInput] = Field(min_length=1)


class PredictionPublic(BaseModel):
    """Classification: `label` and `score` (its probability); regression: `value`."""

    label: str | None = None
    score: float | None = None
    value: float | None = None


class PredictionsPublic(BaseModel):
    """One prediction per input, in order."""

    task: str
    version: int
    predictions: list[PredictionPublic]


# -- health -----------------------------------------------------------------------------


class HealthPublic(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    """Each dependency's readiness."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
