"""The one configuration object of diffbank, read from `DIFFBANK_*` environment variables."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "dev-insecure-change-me"
DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """Every knob of diffbank; embedded defaults live under `data_dir`."""

    model_config = SettingsConfigDict(env_prefix="DIFFBANK_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".diffbank")

    # Backends. Empty means "embedded default under data_dir".
    database_url: str = ""
    store_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_multipart_threshold_bytes: int = 64 * 1024 * 1024
    s3_max_attempts: int = 5
    redis_url: str = ""
    url: str = ""  # where clients reach the API (client CLI)
    api_key: SecretStr | None = None  # the client CLI's bearer key (DIFFBANK_API_KEY)

    base_model: str = DEFAULT_BASE_MODEL
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Slow clients (api/http_protocol.py): the whole request head must arrive within this
    # time; a request body may pause at most this long between bytes (408 / connection cut).
    api_header_timeout_s: float = 30.0
    api_body_idle_timeout_s: float = 60.0

    # Limits on what users may submit.
    max_upload_bytes: int = 64 * 1024 * 1024
    max_rows: int = 500_000
    max_labels: int = 1_000
    max_text_chars: int = 20_000
    max_columns: int = 1_000  # columns of an uploaded table (bounds the parse work)

    secret_key: SecretStr = SecretStr(PLACEHOLDER_SECRET)

    # Jobs. Per-tenant limits on what is queued or running (over them: 429).
    tenant_max_active_jobs: int = 10
    # Training steps (batches: ceil(rows / batch_size) x epochs, both phases), over the jobs;
    # 5M rows x epochs at the default batch size of 32.
    tenant_max_active_work: int = 156_250
    job_max_attempts: int = 3
    job_soft_time_limit_s: int = 6 * 3600
    job_hard_time_limit_s: int = 6 * 3600 + 300
    broker_visibility_timeout_s: int = 12 * 3600
    checkpoint_every_steps: int = 50
    sweep_interval_s: float = 60.0
    sweep_requeue_after_s: float = 120.0
    worker_device: str = ""  # "" = cuda if available, else cpu; or "cuda:1", "cpu"
    job_heartbeat_interval_s: float = 10.0  # a running job's liveness beat (background thread)
    job_progress_interval_s: float = 1.0  # at most one progress row/event per interval
    job_cancel_poll_s: float = 1.0  # how often a running job reads cancel_requested

    # Requests. JSON bodies over the cap get 413 before they are read.
    max_json_bytes: int = 2 * 1024 * 1024
    # Client hosts that may scrape /metrics without a key (comma-separated); others need admin.
    metrics_allowlist: str = ""

    # Serving.
    serving_cache_size: int = 100_000  # decoded diffs resident (entries), beside the bytes bound
    serving_cache_bytes: int = 2 * 1024**3  # decoded diffs resident (bytes)
    serving_device: str = "cpu"  # where the serving base runs: "cpu", "cuda", "cuda:1"
    serving_batch_max_requests: int = 32  # a mixed batch closes at this many requests,
    serving_batch_max_rows: int = 64  # or this many inputs,
    serving_batch_wait_ms: float = 0.0  # or this long after its first request (0: take what waits)
    serving_kernel: Literal["auto", "compiled", "triton", "oracle"] = "auto"  # mixed-forward kernel
    serving_threads: int = 0  # torch threads of the serving process (0: torch's default)
    serving_queue_size: int = 256  # requests waiting for a batch; beyond it 503
    serving_retry_after_s: int = 1  # the Retry-After of that 503
    serving_max_batch: int = 64  # inputs per prediction request
    serving_max_text_chars: int = 4_000  # characters per input text
    # API processes cache key -> principal and task -> served version; each re-reads the
    # registry's change epoch at most this often, so revocations and activations made through
    # any process apply everywhere within it (0: re-read on every request).
    registry_cache_check_s: float = 0.5
    registry_cache_entries: int = 100_000  # per cache and process

    # Consolidation schedule: "" (off), "every <seconds>", or a 5-field cron line.
    consolidation_schedule: str = ""
    consolidation_budget_nnz: int = 0  # policy threshold per tenant and base; 0 = off
    consolidation_tolerance: float = 0.5
    # The policy's groups (diffs/interference.py): every pair overlaps and agrees in sign
    # beyond chance at this family-wise significance level; at most this many tasks per run.
    consolidation_group_alpha: float = 0.01
    consolidation_group_max_tasks: int = 20
    # Effect sizes a grouped pair must also reach: with 10^5 shared positions a 50.8% sign
    # agreement is significant over 100 tasks, so significance alone barely filters.
    consolidation_group_min_sign_agreement: float = Field(
        0.55,
        ge=0.0,
        le=1.0,
        description="A grouped pair agrees in sign on at least this fraction of its shared "
        "positions (0.5 = chance, so 0.55 asks for 5 points beyond it; 0 = no minimum).",
    )
    consolidation_group_min_overlap_lift: float = Field(
        2.0,
        ge=0.0,
        description="A grouped pair shares at least this many times the positions two "
        "independent random supports of their sizes would (1 = chance; 0 = no minimum).",
    )
    interference_max_tasks: int = 200  # tasks one GET /v1/interference may compare

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'diffbank.db'}"
        if not self.store_url:
            self.store_url = (self.data_dir / "objects").resolve().as_uri()
        if not self.url:
            self.url = f"http://{self.api_host}:{self.api_port}"
        if self.env == "production" and self.secret_key.get_secret_value() == PLACEHOLDER_SECRET:
            raise ValueError(
                "DIFFBANK_SECRET_KEY is still the development placeholder; "
                "set a real secret when DIFFBANK_ENV=production"
            )
        return self

    @property
    def metrics_hosts(self) -> list[str]:
        """The client hosts of `metrics_allowlist`."""
        return [host.strip() for host in self.metrics_allowlist.split(",") if host.strip()]

    @property
    def upload_dir(self) -> Path:
        """Where the API streams uploads in flight (temp files; `gc` removes stale ones)."""
        return self.data_dir / "uploads"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
