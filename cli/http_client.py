"""`DiffbankClient`: the Python client of the diffbank HTTP API (httpx, one method per route)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

FINISHED_STATES = ("succeeded", "failed", "cancelled")


class DiffbankError(Exception):
    """An error answer of the server (or no answer), with its status, code, message and field."""

    def __init__(self, status: int | None, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}{where}"


class DiffbankClient:
    """Talks to a diffbank server at `url` with the bearer key `key`.

    `http` lets a caller supply its own `httpx.Client` (FastAPI's TestClient is one).
    """

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout_s: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if http is None:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
            self._owns_http = True
        else:
            self._http = http
            self._http.headers.update(headers)
            self._owns_http = False

    def close(self) -> None:
        """Close the HTTP connection pool (when this client opened it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> DiffbankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DiffbankError(None, "unreachable", f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- health -----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """`GET /healthz`."""
        return self._json("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """`GET /readyz` (raises DiffbankError 503 naming the failing dependency)."""
        return self._json("GET", "/readyz")

    # -- datasets ---------------------------------------------------------------------

    def upload_dataset(
        self,
        path: str | Path,
        *,
        text_field: str | None = None,
        text_pair_field: str | None = None,
        label_field: str | None = None,
        task_type: str | None = None,
    ) -> dict[str, Any]:
        """Upload a JSONL/CSV/Parquet file; the server validates it and answers the dataset."""
        path = Path(path)
        form = {
            k: v
            for k, v in {
                "text_field": text_field,
                "text_pair_field": text_pair_field,
                "label_field": label_field,
                "task_type": task_type,
            }.items()
            if v is not None
        }
        with path.open("rb") as fh:
            return self._json("POST", "/v1/datasets", files={"file": (path.name, fh)}, data=form)

    def list_datasets(self, *, cursor: str | None = None, limit: int | None = None) -> dict:
        """One page of datasets: `{"items", "next_cursor"}`."""
        return self._json("GET", "/v1/datasets", params=_params(cursor=cursor, limit=limit))

    def get_dataset(self, dataset_id: int) -> dict[str, Any]:
        """One dataset."""
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: int) -> None:
        """Delete a dataset no job uses."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # -- jobs -------------------------------------------------------------------------

    def create_job(self, task: str, dataset_id: int, **params: Any) -> dict[str, Any]:
        """Queue a training job (`density`, `epochs`, ... as keyword arguments)."""
        body = {"task": task, "dataset_id": dataset_id}
        body.update({k: v for k, v in params.items() if v is not None})
        return self._json("POST", "/v1/jobs", json=body)

    def list_jobs(
        self,
        *,
        state: str | None = None,
        task: str | None = None,
        kind: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """One page of jobs, newest first: `{"items", "next_cursor"}`."""
        params = _params(state=state, task=task, kind=kind, cursor=cursor, limit=limit)
        return self._json("GET", "/v1/jobs", params=params)

    def get_job(self, job_id: int) -> dict[str, Any]:
        """A job with its state, progress, metrics, error and version."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        """Ask a job to stop (a queued job is cancelled at once)."""
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def job_events(self, job_id: int, *, after: int = 0) -> list[dict[str, Any]]:
        """A job's events with sequence numbers above `after`."""
        return self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after})["items"]

    def wait_job(
        self,
        job_id: int,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it finishes; `on_update` sees every polled state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in FINISHED_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise DiffbankError(None, "timeout", f"job {job_id} still {job['state']}")
            time.sleep(poll_s)

    # -- tasks ------------------------------------------------------------------------

    def list_tasks(self, *, cursor: str | None = None, limit: int | None = None) -> dict:
        """One page of tasks: `{"items", "next_cursor"}`."""
        return self._json("GET", "/v1/tasks", params=_params(cursor=cursor, limit=limit))

    def get_task(self, name: str) -> dict[str, Any]:
        """One task."""
        return self._json("GET", f"/v1/tasks/{name}")

    def task_versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a task with metrics and lineage."""
        return self._json("GET", f"/v1/tasks/{name}/versions")["items"]

    def task_stats(self, name: str, *, version: int | None = None) -> dict[str, Any]:
        """Nonzeros per layer of a task version."""
        return self._json("GET", f"/v1/tasks/{name}/stats", params=_params(version=version))

    def delete_version(self, name: str, number: int) -> None:
        """Delete one version of a task (its blob goes too)."""
        self._request("DELETE", f"/v1/tasks/{name}/versions/{number}")

    def download_diff(
        self, name: str, *, version: int | None = None, dest: str | Path | None = None
    ) -> bytes:
        """A task version's diff artifact, checked against the server's sha256; saved to `dest`."""
        response = self._request("GET", f"/v1/tasks/{name}/diff", params=_params(version=version))
        data = response.content
        expected = response.headers.get("x-diffbank-sha256")
        actual = hashlib.sha256(data).hexdigest()
        if expected and expected != actual:
            raise DiffbankError(
                None,
                "integrity_error",
                f"downloaded diff has sha256 {actual}, server said {expected}",
            )
        if dest is not None:
            Path(dest).write_bytes(data)
        return data

    def predict(
        self,
        name: str,
        inputs: Sequence[str] | Sequence[Sequence[str]],
        *,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Predictions of a task for texts (or `[text, pair]` lists)."""
        body = {"inputs": [x if isinstance(x, str) else list(x) for x in inputs]}
        return self._json(
            "POST", f"/v1/tasks/{name}/predict", params=_params(version=version), json=body
        )

    # -- consolidations ----------------------------------------------------------------

    def create_consolidation(self, **body: Any) -> dict[str, Any]:
        """Start a consolidation run (`budget`, `tasks`, `strategy`, `tolerance`, ...)."""
        return self._json("POST", "/v1/consolidations", json=body)

    def get_consolidation(self, run_id: int) -> dict[str, Any]:
        """A consolidation run with its state, progress and report."""
        return self._json("GET", f"/v1/consolidations/{run_id}")

    # -- interference ------------------------------------------------------------------

    def interference(
        self, tasks: Sequence[str] | None = None, *, base_model: str | None = None
    ) -> dict[str, Any]:
        """Jaccard, sign agreement and cosine between tasks (default: all on the base)."""
        names = ",".join(tasks) if tasks is not None else None
        return self._json(
            "GET", "/v1/interference", params=_params(tasks=names, base_model=base_model)
        )


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _error_from(response: httpx.Response) -> DiffbankError:
    """The server's `{"error": {...}}` as an exception; a non-JSON answer keeps its text."""
    try:
        error = response.json()["error"]
        return DiffbankError(
            response.status_code,
            error.get("code", "error"),
            error.get("message", ""),
            error.get("field"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text.strip()[:500] or response.reason_phrase
        return DiffbankError(response.status_code, "http_error", text)
