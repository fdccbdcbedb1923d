"""Tasks and versions: list, get, versions with lineage, diff download (Range, ETag, presign), stats."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from api.deps import (
    CursorQuery,
    PageLimitQuery,
    ReadPrincipal,
    SessionDep,
    StoreDep,
    SubmitPrincipal,
)
from api.errors import ApiError
from api.schemas import (
    ROUTE_ERRORS,
    ErrorPublic,
    LineagePublic,
    TaskPublic,
    TasksPublic,
    TaskStatsPublic,
    TaskVersionPublic,
    TaskVersionsPublic,
)
from registry import catalog
from registry.models import Task, TaskVersion

router = APIRouter(prefix="/tasks", tags=["tasks"])

ERRORS = ROUTE_ERRORS
TaskNamePath = Annotated[str, Path(max_length=128)]
VersionQuery = Annotated[int | None, Query(ge=1, description="version number (default: active)")]
PRESIGN_EXPIRES_S = 900
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def task_public(task: Task) -> TaskPublic:
    """The API view of a task row."""
    return TaskPublic(
        name=task.name,
        base_model=task.base_model.name,
        task_type=task.task_type,
        label_names=list(task.label_names or []),
        active_version=task.active_version,
        created_at=task.created_at,
    )


def version_public(
    version: TaskVersion, *, active: int | None, parents: dict[int, int]
) -> TaskVersionPublic:
    """The API view of a task version row; `parents` maps version ids to numbers."""
    return TaskVersionPublic(
        number=version.number,
        active=version.number == active,
        nnz=version.nnz,
        density=version.density,
        metrics=version.metrics or {},
        config=version.config or {},
        sha256=version.artifact.sha256,
        size_bytes=version.artifact.size_bytes,
        lineage=LineagePublic(
            source_job_id=version.source_job_id,
            consolidation_run_id=version.consolidation_run_id,
            parent_version=parents.get(version.parent_version_id),
        ),
        created_at=version.created_at,
    )


@router.get("", response_model=TasksPublic, responses=ERRORS, summary="List tasks")
def list_tasks(
    principal: ReadPrincipal,
    session: SessionDep,
    cursor: CursorQuery = None,
    limit: PageLimitQuery = 50,
) -> TasksPublic:
    """The caller's tasks, newest first."""
    rows, next_cursor = catalog.list_tasks(
        session, tenant_id=principal.tenant_id, cursor=cursor, limit=limit
    )
    return TasksPublic(items=[task_public(t) for t in rows], next_cursor=next_cursor)


@router.get("/{name}", response_model=TaskPublic, responses=ERRORS, summary="Get a task")
def get_task(name: TaskNamePath, principal: ReadPrincipal, session: SessionDep) -> TaskPublic:
    """One of the caller's tasks (another tenant's name answers 404)."""
    return task_public(catalog.get_task(session, tenant_id=principal.tenant_id, name=name))


@router.get(
    "/{name}/versions",
    response_model=TaskVersionsPublic,
    responses=ERRORS,
    summary="A task's versions",
)
def list_versions(
    name: TaskNamePath, principal: ReadPrincipal, session: SessionDep
) -> TaskVersionsPublic:
    """Every version with metrics, config and lineage, oldest first."""
    task = catalog.get_task(session, tenant_id=principal.tenant_id, name=name)
    versions = catalog.list_task_versions(session, tenant_id=principal.tenant_id, name=name)
    parents = {v.id: v.number for v in versions}
    return TaskVersionsPublic(
        items=[version_public(v, active=task.active_version, parents=parents) for v in versions]
    )


@router.delete(
    "/{name}/versions/{number}", status_code=204, responses=ERRORS, summary="Delete a task version"
)
def delete_version(
    name: TaskNamePath,
    number: Annotated[int, Path(ge=1)],
    principal: SubmitPrincipal,
    session: SessionDep,
    store: StoreDep,
) -> Response:
    """Delete a version and its blob; if it was active, the newest remaining one becomes active."""
    catalog.delete_task_version(
        session, store, tenant_id=principal.tenant_id, name=name, number=number
    )
    return Response(status_code=204)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` -> [start, end); None when not satisfiable.

    Only single byte ranges are served; callers ignore other Range forms (see `_wants_range`).
    """
    match = _RANGE_RE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        length = int(last)
        if length == 0:
            return None
        return max(0, size - length), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        return None
    return start, end


def _wants_range(header: str | None) -> bool:
    """A single `bytes=` range; other units and multi-range requests get the whole file (RFC 9110)."""
    if not header:
        return False
    value = header.strip()
    return value.lower().startswith("bytes=") and "," not in value


@router.get(
    "/{name}/diff",
    responses={
        **ERRORS,
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The artifact (safetensors)",
        },
        206: {"description": "The requested byte range"},
        307: {"description": "Redirect to a presigned URL (`presign=1` on an S3 store)"},
        416: {"model": ErrorPublic, "description": "Range not satisfiable"},
    },
    response_class=Response,
    summary="Download a task's diff",
)
def download_diff(
    name: TaskNamePath,
    principal: ReadPrincipal,
    session: SessionDep,
    store: StoreDep,
    version: VersionQuery = None,
    presign: Annotated[bool, Query(description="redirect to a presigned URL (S3 stores)")] = False,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    layout: Annotated[
        Literal["composed", "factored"],
        Query(
            description="`factored`: JSON listing of a consolidated version's shared and "
            "residual diffs (see /v1/tasks/{name}/versions/{n}/parts)"
        ),
    ] = "composed",
) -> Response:
    """The artifact streamed with `ETag` and `X-Diffbank-Sha256`; `Range` answers 206.

    With `presign=1` an S3 store answers 307 to a presigned URL; a file store cannot presign,
    so the artifact is streamed as without it.
    """
    row = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=version
    )
    if layout == "factored":
        from api.routes.consolidations import version_parts

        return JSONResponse(version_parts(row, name=name, session=session).model_dump())
    artifact = row.artifact
    etag = f'"{artifact.sha256}"'
    headers = {
        "ETag": etag,
        "X-Diffbank-Sha256": artifact.sha256,
        "X-Diffbank-Version": str(row.number),
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{name}-v{row.number}.safetensors"',
    }
    if presign:
        url = store.presign(artifact.object_key, PRESIGN_EXPIRES_S)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers=headers)
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    size = artifact.size_bytes
    if _wants_range(range_header):
        span = _parse_range(range_header, size)
        if span is None:
            raise ApiError(
                416,
                "range_not_satisfiable",
                f"range {range_header!r} is not satisfiable for {size} bytes",
                field="Range",
                headers={"Content-Range": f"bytes */{size}"},
            )
        start, end = span
        body = _started(
            store.open(artifact.object_key, sha256=artifact.sha256, start=start, end=end)
        )
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        return StreamingResponse(
            body, status_code=206, headers=headers, media_type="application/octet-stream"
        )
    # A full read is verified against the sha256 before the first byte goes out.
    body = _started(store.open(artifact.object_key, sha256=artifact.sha256))
    headers["Content-Length"] = str(size)
    return StreamingResponse(body, headers=headers, media_type="application/octet-stream")


def _started(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pull the first chunk now, so a missing or corrupt blob fails before the status goes out."""
    first = next(chunks, b"")
    return itertools.chain([first], chunks)


@router.get(
    "/{name}/stats", response_model=TaskStatsPublic, responses=ERRORS, summary="Nonzeros per layer"
)
def task_stats(
    name: TaskNamePath,
    principal: ReadPrincipal,
    session: SessionDep,
    store: StoreDep,
    version: VersionQuery = None,
) -> TaskStatsPublic:
    """Where a version's nonzeros sit (per layer), read from the stored artifact."""
    from registry.artifact import loads_artifact, nonzeros_per_layer

    row = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=version
    )
    data = store.get(row.artifact.object_key, sha256=row.artifact.sha256)
    diff = loads_artifact(data)
    return TaskStatsPublic(
        task=name,
        version=row.number,
        nnz=diff.nnz,
        n_params=diff.meta.n_params,
        density=diff.meta.density,
        nonzeros_per_layer=nonzeros_per_layer(diff),
    )
