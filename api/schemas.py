"""Request and response bodies of the HTTP API, one family per entity.

Response models read registry rows directly (`XPublic.model_validate(row)`, from attributes);
a field that is not a column of the same name says where it comes from with a validation alias
or a before-validator. Fields that need more than the row (e.g. a version's lineage) are set
by the route with `model_copy(update=...)`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)

from diffs.basemodel import public_base_name
from registry.catalog.consolidation import STRATEGIES
from worker.diffprune.config import DiffPruneConfig


def plain_text(value: str | None) -> str | None:
    """`value` if it has no control character and is valid Unicode (no lone surrogate)."""
    if value is not None:
        if any(ord(ch) < 32 for ch in value):
            raise ValueError("must not contain control characters")
        value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (a ValueError)
    return value


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


def _empty_if_none(value: Any, empty: type) -> Any:
    """A NULL JSON column read as an empty dict or list."""
    return empty() if value is None else value


def _job_error(job: Any) -> dict[str, Any] | None:
    """A job row's error code and message, or None when it has neither."""
    if job.error_code or job.error_message:
        return {"code": job.error_code, "message": job.error_message}
    return None


class _RowView:
    """A row's attributes, some of them replaced: what from-attributes validation reads."""

    def __init__(self, row: Any, **fields: Any) -> None:
        self._row = row
        self._fields = fields

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__["_fields"]
        return fields[name] if name in fields else getattr(self.__dict__["_row"], name)


# -- datasets ---------------------------------------------------------------------------


class DatasetPublic(BaseModel):
    """An uploaded, validated dataset."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    filename: str
    format: str
    sha256: str
    size_bytes: int
    rows: int
    labels: list[str] = Field(validation_alias=AliasChoices("labels", "label_names"))
    task_type: TaskType
    text_field: str
    text_pair_field: str | None = None
    label_field: str
    created_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _spell_out_column_mapping(cls, data: Any) -> Any:
        """A dataset row: the three column names come from its `column_mapping`."""
        if isinstance(data, dict) or not hasattr(data, "column_mapping"):
            return data
        mapping = data.column_mapping or {}
        return _RowView(
            data,
            label_names=list(data.label_names or []),
            text_field=mapping.get("text_field", "text"),
            text_pair_field=mapping.get("text_pair_field"),
            label_field=mapping.get("label_field", "label"),
        )


class DatasetsPublic(BaseModel):
    """A page of datasets."""

    items: list[DatasetPublic]
    next_cursor: str | None = None


# -- jobs -------------------------------------------------------------------------------


def config_fields(config_class: type) -> dict[str, Any]:
    """Optional request fields for the fields of a method config (`worker.kit.config`) that a
    job may set: type, bounds and help from the config; None leaves the config's default."""
    return {
        spec.name: (
            config_class.value_type(spec.name) | None,
            Field(default=None, description=spec.metadata["help"], **spec.metadata["api"]),
        )
        for spec in config_class.api_fields()
    }


class _JobTarget(BaseModel):
    """What a training job learns from (its knobs: `JobCreate`)."""

    # Strict: `true` is not a dataset id, nor "2" an epoch count.
    model_config = ConfigDict(extra="forbid", strict=True)

    task: TaskName
    dataset_id: int = Field(ge=1)
    validation_dataset_id: int | None = Field(default=None, ge=1)
    base_model: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("base_model")
    @classmethod
    def _base_model_is_text(cls, value: str | None) -> str | None:
        return plain_text(value)

    @model_validator(mode="after")
    def _validation_is_another_dataset(self) -> _JobTarget:
        if self.validation_dataset_id is not None and self.validation_dataset_id == self.dataset_id:
            raise ValueError(
                "validation_dataset_id must name another dataset than dataset_id (or be left "
                "out: a validation split is then carved from the training rows)"
            )
        return self

    def params(self) -> dict[str, Any]:
        """The hyperparameters the user set (others keep the trainer's defaults)."""
        knobs = self.model_dump(exclude=set(_JobTarget.model_fields), exclude_none=True)
        return dict(sorted(knobs.items()))


JobCreate = create_model(
    "JobCreate",
    __base__=_JobTarget,
    __doc__="A training job: learn a sparse diff for `task` from `dataset_id`. Unset knobs use "
    "defaults.",
    **config_fields(DiffPruneConfig),
)


class JobProgressPublic(BaseModel):
    """Where a running job is."""

    # Other keys of a job's progress are not shown (extra keys are ignored).

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

    # `version` is not a job column: the route sets it from the job's result version.

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: JobKind
    state: JobState
    task: str | None = Field(default=None, validation_alias=AliasChoices("task", "task_name"))
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

    @model_validator(mode="before")
    @classmethod
    def _error_of_row(cls, data: Any) -> Any:
        """A job row: `error` comes from its error code and message."""
        if isinstance(data, dict) or not hasattr(data, "error_code"):
            return data
        return _RowView(data, error=_job_error(data))

    @field_validator("base_model")
    @classmethod
    def _public_base(cls, value: str | None) -> str | None:
        """The base's public name, never the server's filesystem path."""
        return None if value is None else public_base_name(value)

    @field_validator("params", "metrics", "progress", mode="before")
    @classmethod
    def _dict_if_none(cls, value: Any) -> Any:
        return _empty_if_none(value, dict)

    @field_validator("cancel_requested", mode="before")
    @classmethod
    def _bool_if_none(cls, value: Any) -> Any:
        return bool(value)


class JobsPublic(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobPublic]
    next_cursor: str | None = None


class JobEventPublic(BaseModel):
    """One state change or progress report of a job."""

    model_config = ConfigDict(from_attributes=True)

    seq: int
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None

    @field_validator("payload", mode="before")
    @classmethod
    def _dict_if_none(cls, value: Any) -> Any:
        return _empty_if_none(value, dict)


class JobEventsPublic(BaseModel):
    """Events of a job after a given sequence number, oldest first."""

    items: list[JobEventPublic]


# -- tasks ------------------------------------------------------------------------------


class TaskPublic(BaseModel):
    """A task: a name on one base model with versions of its diff."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    base_model: str
    task_type: TaskType
    label_names: list[str] = Field(default_factory=list)
    active_version: int | None = None
    created_at: datetime | None = None

    @field_validator("base_model", mode="before")
    @classmethod
    def _name_of_base(cls, value: Any) -> Any:
        """A task row's base model is a row: its name."""
        return value if isinstance(value, str) else value.name

    @field_validator("label_names", mode="before")
    @classmethod
    def _list_if_none(cls, value: Any) -> Any:
        return list(_empty_if_none(value, list))


class TasksPublic(BaseModel):
    """A page of tasks."""

    items: list[TaskPublic]
    next_cursor: str | None = None


class LineagePublic(BaseModel):
    """Where a task version came from."""

    # `parent_version` is a number: the route sets it from the row's parent_version_id.

    model_config = ConfigDict(from_attributes=True)

    source_job_id: int | None = None
    consolidation_run_id: int | None = None
    parent_version: int | None = None


class TaskVersionPublic(BaseModel):
    """One published version of a task's diff."""

    # `active`, `lineage` and a composed-on-request version's digest: the route sets them.

    model_config = ConfigDict(from_attributes=True)

    number: int
    active: bool = False
    nnz: int | None = None
    density: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    sha256: str | None = Field(
        default=None,
        validation_alias=AliasChoices("sha256", AliasPath("artifact", "sha256")),
        description="sha256 of what the version's diff download returns (its ETag)",
    )
    size_bytes: int | None = Field(
        default=None,
        validation_alias=AliasChoices("size_bytes", AliasPath("artifact", "size_bytes")),
        description="bytes of what the version's diff download returns",
    )
    lineage: LineagePublic = Field(default_factory=LineagePublic)
    created_at: datetime | None = None

    @field_validator("metrics", "config", mode="before")
    @classmethod
    def _dict_if_none(cls, value: Any) -> Any:
        return _empty_if_none(value, dict)


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


# -- consolidations ---------------------------------------------------------------------


class ConsolidationCreate(BaseModel):
    """Re-fit `tasks` (default: every task of yours on the base) under one budget."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: list[TaskName] | None = Field(default=None, min_length=1, max_length=64)
    budget: int = Field(ge=1, description="total stored nonzeros (or bytes), shared part once")
    budget_kind: Literal["nnz", "bytes"] = "nnz"
    strategy: Literal[STRATEGIES] = "elementwise"  # type: ignore[valid-type]
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
    merge_weight: float | None = Field(default=None, gt=0.0, le=100.0, description="merges' λ")
    ties_density: float | None = Field(default=None, gt=0.0, le=1.0)
    dare_drop: float | None = Field(default=None, ge=0.0, lt=1.0)

    @field_validator("base_model")
    @classmethod
    def _base_model_is_text(cls, value: str | None) -> str | None:
        return plain_text(value)

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


def _from_job(name: str) -> AliasChoices:
    """Validation alias of a run field read from the run's job."""
    return AliasChoices(name, AliasPath("job", name))


def _from_report(name: str) -> AliasChoices:
    """Validation alias of a run field read from the run's report."""
    return AliasChoices(name, AliasPath("report", name))


class ConsolidationPublic(BaseModel):
    """A consolidation run, its job's state and, once finished, its report."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: int
    state: str = Field(validation_alias=_from_job("state"))
    trigger: str
    base_model: str
    strategy: str
    budget: int
    budget_kind: str
    tolerance: float
    task_names: list[str]
    progress: dict[str, Any] = Field(default_factory=dict, validation_alias=_from_job("progress"))
    error: dict[str, Any] | None = None
    total_nnz_before: int | None = None
    total_nnz_after: int | None = None
    shared_nnz: int | None = Field(default=None, validation_alias=_from_report("shared_nnz"))
    tasks: list[ConsolidationTaskPublic] = Field(
        default_factory=list, validation_alias=_from_report("tasks")
    )
    report: dict[str, Any] = Field(default_factory=dict)

    @field_validator("base_model")
    @classmethod
    def _public_base(cls, value: str) -> str:
        """The base's public name, never the server's filesystem path."""
        return public_base_name(value)

    created_at: datetime | None = None
    finished_at: datetime | None = Field(default=None, validation_alias=_from_job("finished_at"))

    @model_validator(mode="before")
    @classmethod
    def _error_of_job(cls, data: Any) -> Any:
        """A run row: `error` comes from its job's error code and message."""
        if isinstance(data, dict) or not hasattr(data, "job"):
            return data
        return _RowView(data, error=_job_error(data.job), report=data.report or {})

    @field_validator("progress", "report", mode="before")
    @classmethod
    def _dict_if_none(cls, value: Any) -> Any:
        return dict(_empty_if_none(value, dict))

    @field_validator("task_names", mode="before")
    @classmethod
    def _list_if_none(cls, value: Any) -> Any:
        return list(_empty_if_none(value, list))


class ConsolidationsPublic(BaseModel):
    """A page of runs, newest first."""

    items: list[ConsolidationPublic]
    next_cursor: str | None = None


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


# -- keys -------------------------------------------------------------------------------


class ApiKeyPublic(BaseModel):
    """An API key as an admin sees it: never the key itself, only its public prefix."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    prefix: str
    tenant: str
    scopes: list[str]
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @field_validator("tenant", mode="before")
    @classmethod
    def _name_of_tenant(cls, value: Any) -> Any:
        """A key row's tenant is a row: its name."""
        return value if isinstance(value, str) else value.name


class ApiKeysPublic(BaseModel):
    """The tenant's API keys, revoked ones included, in id order."""

    items: list[ApiKeyPublic]


# -- health -----------------------------------------------------------------------------


class HealthPublic(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    """Each dependency's readiness."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


# -- interference -----------------------------------------------------------------------

Matrix = list[list[float | None]]


class InterferencePublic(BaseModel):
    """Pairwise interference of task diffs on one base; rows and columns follow `tasks`."""

    base_model: str
    tasks: list[str]
    versions: list[int] = Field(description="the active version of each task, compared")
    n_params: int
    support: list[int] = Field(description="positions each task's diff changes")
    shared: list[list[int]] = Field(description="positions both diffs change")
    jaccard: Matrix = Field(description="support overlap |Si ∩ Sj| / |Si ∪ Sj|")
    sign_agreement: Matrix = Field(
        description="fraction of shared positions whose signs agree; null when none is shared"
    )
    cosine: Matrix = Field(description="cosine of the diffs over all positions")
    overlap_lift: Matrix = Field(
        description="shared positions over what independent random supports would share"
    )
    groups: list[list[str]] = Field(
        description="the consolidation groups the scheduled policy forms among these tasks"
    )
