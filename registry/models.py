"""SQLAlchemy 2.0 typed models of the registry: everything diffbank knows, one table each."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so Alembic migrations and autogenerate agree on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_JOB_STATES = ("succeeded", "failed", "cancelled")
JOB_KINDS = ("train", "consolidate")
ARTIFACT_KINDS = ("diff", "shared-diff", "residual-diff", "dataset")
API_SCOPES = ("read", "submit", "admin")
# Ids are never handed out twice, even after the newest row is deleted: SQLite reuses the
# largest rowid + 1 unless the table is AUTOINCREMENT (PostgreSQL sequences never go back).
AUTOINCREMENT = {"sqlite_autoincrement": True}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that reads back as aware UTC on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC timestamp column")
        value = value.astimezone(UTC)
        # SQLite stores text: drop the offset so every stored value compares lexically.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every registry table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class BaseModel(Base):
    """A pretrained encoder every task of it shares (identified by name and fingerprint)."""

    __tablename__ = "base_models"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    source: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    n_params: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Tenant(Base):
    """An owner of datasets, tasks and jobs; API keys belong to one."""

    __tablename__ = "tenants"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key of a tenant; only its sha256 is stored, found by its public prefix."""

    __tablename__ = "api_keys"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Artifact(Base):
    """A content-addressed blob in the object store that some row references."""

    __tablename__ = "artifacts"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    object_key: Mapped[str] = mapped_column(String(1024), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """An uploaded, validated training or validation file of a tenant."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_id_id", "tenant_id", "id"), AUTOINCREMENT)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"), index=True)
    rows: Mapped[int] = mapped_column(Integer)
    label_names: Mapped[list[str]]
    task_type: Mapped[str] = mapped_column(String(32))
    column_mapping: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    artifact: Mapped[Artifact] = relationship(lazy="joined")

    @property
    def object_key(self) -> str:
        """Where the file's bytes live in the object store."""
        return self.artifact.object_key


class Task(Base):
    """A named task of a tenant on one base model; points at its active version number."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("tenant_id", "name"), AUTOINCREMENT)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    task_type: Mapped[str] = mapped_column(String(32))
    label_names: Mapped[list[str]]
    active_version: Mapped[int | None] = mapped_column(Integer)
    last_version_number: Mapped[int] = mapped_column(Integer, default=0)  # numbers never reused
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    base_model: Mapped[BaseModel] = relationship(lazy="joined")


class Job(Base):
    """A queued unit of GPU work: train one task, or consolidate several."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_state", "state"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    task_name: Mapped[str | None] = mapped_column(String(255))
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    validation_dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    base_model: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Not a foreign key: task versions point back at their job (source_job_id), and a
    # version may be deleted while the job's history stays.
    result_version_id: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state."""
        return self.state in FINISHED_JOB_STATES


class JobEvent(Base):
    """One state change or progress report of a job, numbered per job from 1."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"), AUTOINCREMENT)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsolidationRun(Base):
    """A multitask re-prune of several tasks under one budget (one job each)."""

    __tablename__ = "consolidation_runs"
    __table_args__ = (Index("ix_consolidation_runs_tenant_id_id", "tenant_id", "id"), AUTOINCREMENT)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    base_model: Mapped[str] = mapped_column(String(255))
    strategy: Mapped[str] = mapped_column(String(16))
    budget: Mapped[int] = mapped_column(BigInteger)
    budget_kind: Mapped[str] = mapped_column(String(8))
    tolerance: Mapped[float] = mapped_column(Float)
    task_names: Mapped[list[str]]
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    shared_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"), index=True)
    total_nnz_before: Mapped[int | None] = mapped_column(BigInteger)
    total_nnz_after: Mapped[int | None] = mapped_column(BigInteger)
    trigger: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(lazy="joined")


class TaskVersion(Base):
    """One published diff of a task; numbers grow by one per task and are never reused."""

    __tablename__ = "task_versions"
    __table_args__ = (UniqueConstraint("task_id", "number"), AUTOINCREMENT)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    config: Mapped[dict[str, Any]]
    nnz: Mapped[int] = mapped_column(BigInteger)
    density: Mapped[float] = mapped_column(Float)
    source_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    consolidation_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("consolidation_runs.id", ondelete="SET NULL"), index=True
    )
    parent_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("task_versions.id", ondelete="SET NULL"), index=True
    )
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"), index=True)
    residual_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"), index=True)
    shared_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    artifact: Mapped[Artifact] = relationship(foreign_keys=[artifact_id], lazy="joined")
    residual_artifact: Mapped[Artifact | None] = relationship(
        foreign_keys=[residual_artifact_id], lazy="joined"
    )
    shared_artifact: Mapped[Artifact | None] = relationship(
        foreign_keys=[shared_artifact_id], lazy="joined"
    )


# The one row of `change_epochs`: the registry-wide epoch (more rows could scope it later).
GLOBAL_EPOCH_ID = 1


class ChangeEpoch(Base):
    """A counter that every change to what API processes cache (keys, served versions) bumps."""

    __tablename__ = "change_epochs"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)


# Every (table, column) that references an artifact: an artifact none of them names is garbage.
ARTIFACT_REFERENCES = (
    (Dataset, Dataset.artifact_id),
    (TaskVersion, TaskVersion.artifact_id),
    (TaskVersion, TaskVersion.residual_artifact_id),
    (TaskVersion, TaskVersion.shared_artifact_id),
    (ConsolidationRun, ConsolidationRun.shared_artifact_id),
)
