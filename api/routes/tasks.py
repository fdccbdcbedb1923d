"""Everything under /tasks: list, get, versions with lineage, delete and activate (rollback) a
version, diff download (Range, ETag, presign), stats, a consolidated version's parts, and
(mounted from api/routes/predict.py) predictions.

`GET /v1/tasks/{name}/diff` returns a consolidated version's composed diff by default: a version
of a current run stores only its residual beside the run's shared diff, so the composed artifact
is built on request (`diffs.compose`, for the layouts of `registry.layouts`; deterministic
bytes, so its sha256 / ETag and byte ranges are stable). Its sha256 and size were recorded at
publish: listings, ETags and 304s need no composing, and composed bytes stay in a small
in-process LRU (`COMPOSED`) for ranges and repeats. An older run's version stored its composed
blob, which is streamed. The parts — the run's shared diff and the task's residual — are listed by
`GET /v1/tasks/{name}/versions/{n}/parts` (also what `GET /v1/tasks/{name}/diff?layout=factored`
answers): JSON with a download URL per part, to be applied in the listed order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from api.deps import (
    CursorQuery,
    PageLimitQuery,
    Principal,
    SessionDep,
    StoreDep,
    require,
)
from api.errors import ApiError, artifact_mismatch
from api.routes import predict
from api.schemas import (
    ROUTE_ERRORS,
    ErrorPublic,
    LineagePublic,
    TaskPublic,
    TasksPublic,
    TaskStatsPublic,
    TaskVersionPublic,
    TaskVersionsPublic,
    VersionPartPublic,
    VersionPartsPublic,
)
from api.streaming import parse_range, range_applies, started, wants_range
from registry import catalog
from registry.layouts import (
    COMPOSED_ON_REQUEST,
    SINGLE,
    ComposedCache,
    Digest,
    download_digest,
    layout_of,
    version_diff_bytes,
)
from registry.models import Artifact, TaskVersion

router = APIRouter(prefix="/tasks")

# Tags per route: rollback and the parts of consolidated versions are documented with
# consolidations, where they come from.
TASKS = ["tasks"]
CONSOLIDATIONS = ["consolidations"]
ERRORS = ROUTE_ERRORS
TaskNamePath = Annotated[str, Path(max_length=128)]
VersionNumberPath = Annotated[int, Path(ge=1)]
VersionQuery = Annotated[int | None, Query(ge=1, description="version number (default: active)")]
PRESIGN_EXPIRES_S = 900
COMPOSED = ComposedCache()  # composed artifacts by their parts' sha256s, shared by every request


def version_public(
    version: TaskVersion, *, active: int | None, parents: dict[int, int]
) -> TaskVersionPublic:
    """The API view of a task version row; `parents` maps version ids to numbers.

    `sha256` and `size_bytes` are those of what the version's download returns (null for a
    version composed on request published before its composed digest was recorded).
    """
    lineage = LineagePublic.model_validate(version).model_copy(
        update={"parent_version": parents.get(version.parent_version_id)}
    )
    digest = download_digest(version)
    return TaskVersionPublic.model_validate(version).model_copy(
        update={
            "active": version.number == active,
            "lineage": lineage,
            "sha256": digest.sha256 if digest else None,
            "size_bytes": digest.size_bytes if digest else None,
        }
    )


@router.get("", response_model=TasksPublic, responses=ERRORS, tags=TASKS, summary="List tasks")
def list_tasks(
    principal: Annotated[Principal, Depends(require("tasks.read"))],
    session: SessionDep,
    cursor: CursorQuery = None,
    limit: PageLimitQuery = 50,
) -> TasksPublic:
    """The caller's tasks, newest first."""
    rows, next_cursor = catalog.list_tasks(
        session, tenant_id=principal.tenant_id, cursor=cursor, limit=limit
    )
    return TasksPublic(items=[TaskPublic.model_validate(t) for t in rows], next_cursor=next_cursor)


@router.get(
    "/{name}", response_model=TaskPublic, responses=ERRORS, tags=TASKS, summary="Get a task"
)
def get_task(
    name: TaskNamePath,
    principal: Annotated[Principal, Depends(require("tasks.read"))],
    session: SessionDep,
) -> TaskPublic:
    """One of the caller's tasks (another tenant's name answers 404)."""
    return TaskPublic.model_validate(
        catalog.get_task(session, tenant_id=principal.tenant_id, name=name)
    )


@router.get(
    "/{name}/versions",
    response_model=TaskVersionsPublic,
    responses=ERRORS,
    tags=TASKS,
    summary="A task's versions",
)
def list_versions(
    name: TaskNamePath,
    principal: Annotated[Principal, Depends(require("tasks.read"))],
    session: SessionDep,
) -> TaskVersionsPublic:
    """Every version with metrics, config and lineage, oldest first."""
    task = catalog.get_task(session, tenant_id=principal.tenant_id, name=name)
    versions = catalog.list_task_versions(session, tenant_id=principal.tenant_id, name=name)
    parents = {v.id: v.number for v in versions}
    return TaskVersionsPublic(
        items=[version_public(v, active=task.active_version, parents=parents) for v in versions]
    )


@router.delete(
    "/{name}/versions/{number}",
    status_code=204,
    responses=ERRORS,
    tags=TASKS,
    summary="Delete a task version",
)
def delete_version(
    name: TaskNamePath,
    number: VersionNumberPath,
    principal: Annotated[Principal, Depends(require("versions.delete"))],
    session: SessionDep,
    store: StoreDep,
) -> Response:
    """Delete a version and its blob; if it was active, the newest remaining one becomes active."""
    catalog.delete_task_version(
        session, store, tenant_id=principal.tenant_id, name=name, number=number
    )
    return Response(status_code=204)


@router.get(
    "/{name}/diff",
    responses={
        **ERRORS,
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The artifact (safetensors)",
        },
        206: {"description": "The requested byte range"},
        304: {"description": "Not modified (`If-None-Match` names the current ETag)"},
        307: {"description": "Redirect to a presigned URL (`presign=1` on an S3 store)"},
        416: {"model": ErrorPublic, "description": "Range not satisfiable"},
    },
    response_class=Response,
    tags=TASKS,
    summary="Download a task's diff",
)
def download_diff(
    name: TaskNamePath,
    principal: Annotated[Principal, Depends(require("tasks.read"))],
    session: SessionDep,
    store: StoreDep,
    version: VersionQuery = None,
    presign: Annotated[bool, Query(description="redirect to a presigned URL (S3 stores)")] = False,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
    layout: Annotated[
        Literal["composed", "factored"],
        Query(
            description="`factored`: JSON listing of a consolidated version's shared and "
            "residual diffs (see /v1/tasks/{name}/versions/{n}/parts)"
        ),
    ] = "composed",
) -> Response:
    """The artifact streamed with `ETag` and `X-Diffbank-Sha256`; `Range` answers 206.

    An `If-Range` that does not match the current ETag (an older artifact, or a date: no
    Last-Modified is sent) makes it 200 with the whole file, so a resume never mixes two.

    With `presign=1` an S3 store answers 307 to a presigned URL; a file store cannot presign,
    and a diff composed on request has no stored blob, so those are streamed as without it.
    """
    row = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=version
    )
    if layout == "factored":
        return JSONResponse(
            version_parts(row, name=name, session=session, store=store).model_dump()
        )
    read: Callable[[int | None, int | None], Iterator[bytes]]
    if layout_of(row) == COMPOSED_ON_REQUEST:
        sha256, size = _composed_digest(store, row, name=name)
        presigned = None

        def read(start: int | None, end: int | None) -> Iterator[bytes]:
            return iter([_composed_bytes(store, row, name=name)[start:end]])
    else:
        artifact = row.artifact
        sha256, size, presigned = artifact.sha256, artifact.size_bytes, artifact.object_key

        def read(start: int | None, end: int | None) -> Iterator[bytes]:
            if start is None:
                return store.open(artifact.object_key, sha256=artifact.sha256)
            return store.open(artifact.object_key, sha256=artifact.sha256, start=start, end=end)

    etag = f'"{sha256}"'
    headers = {
        "ETag": etag,
        "X-Diffbank-Sha256": sha256,
        "X-Diffbank-Version": str(row.number),
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{name}-v{row.number}.safetensors"',
    }
    if presign and presigned is not None:
        url = store.presign(presigned, PRESIGN_EXPIRES_S)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers=headers)
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    if wants_range(range_header) and range_applies(if_range, etag):
        span = parse_range(range_header, size)
        if span is None:
            raise ApiError(
                416,
                "range_not_satisfiable",
                f"range {range_header!r} is not satisfiable for {size} bytes",
                field="Range",
                headers={"Content-Range": f"bytes */{size}"},
            )
        start, end = span
        body = started(read(start, end))
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        return StreamingResponse(
            body, status_code=206, headers=headers, media_type="application/octet-stream"
        )
    # A full read is verified against the sha256 before the first byte goes out.
    body = started(read(None, None))
    headers["Content-Length"] = str(size)
    return StreamingResponse(body, headers=headers, media_type="application/octet-stream")


def _composed_digest(store, version: TaskVersion, *, name: str) -> Digest:
    """sha256 and size of a version's composed artifact: recorded at publish, else composed."""
    recorded = download_digest(version)
    if recorded is not None:
        return recorded
    data = _composed_bytes(store, version, name=name)
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def _composed_bytes(store, version: TaskVersion, *, name: str) -> bytes:
    """A version's composed artifact, from the LRU or built from its parts (409 if unusable)."""
    from diffs.types import ArtifactError

    try:
        return version_diff_bytes(store, version, cache=COMPOSED)
    except ArtifactError as exc:
        raise artifact_mismatch(name, version.number, exc, cannot="composed") from None


@router.get(
    "/{name}/stats",
    response_model=TaskStatsPublic,
    responses=ERRORS,
    tags=TASKS,
    summary="Nonzeros per layer",
)
def task_stats(
    name: TaskNamePath,
    principal: Annotated[Principal, Depends(require("tasks.read"))],
    session: SessionDep,
    store: StoreDep,
    version: VersionQuery = None,
) -> TaskStatsPublic:
    """Where a version's stored values sit (per layer), read from its (composed) diff."""
    from diffs.diffstats import nonzeros_per_layer
    from diffs.types import ArtifactError
    from registry.layouts import version_diff

    row = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=version
    )
    try:
        diff = version_diff(store, row, cache=COMPOSED)
    except ArtifactError as exc:
        raise artifact_mismatch(name, row.number, exc, cannot="read") from None
    return TaskStatsPublic(
        task=name,
        version=row.number,
        nnz=diff.nnz,
        n_params=diff.meta.n_params,
        density=diff.meta.density,
        nonzeros_per_layer=nonzeros_per_layer(diff),
    )


@router.post(
    "/{name}/versions/{number}/activate",
    response_model=TaskPublic,
    responses=ERRORS,
    tags=CONSOLIDATIONS,
    summary="Serve a given version (rollback)",
)
def activate_version(
    name: TaskNamePath,
    number: VersionNumberPath,
    principal: Annotated[Principal, Depends(require("versions.activate"))],
    session: SessionDep,
) -> TaskPublic:
    """Make version `number` the active one, e.g. to undo a consolidation."""
    catalog.activate_version(session, tenant_id=principal.tenant_id, name=name, number=number)
    return TaskPublic.model_validate(
        catalog.get_task(session, tenant_id=principal.tenant_id, name=name)
    )


def _require_parts(version: TaskVersion, *, name: str) -> None:
    """409 unless the version is a consolidated one with shared and residual parts."""
    if layout_of(version) == SINGLE:
        raise ApiError(
            409,
            "not_factored",
            f"version {version.number} of task {name!r} is not a consolidated version "
            "and has no factored layout",
            field="layout",
        )


def version_parts(version: TaskVersion, *, name: str, session, store) -> VersionPartsPublic:
    """The factored layout of a consolidated version; 409 for a version that has no parts."""
    _require_parts(version, name=name)
    with catalog.transaction(session):
        shared = session.get(Artifact, version.shared_artifact_id)
        residual = session.get(Artifact, version.residual_artifact_id)
    base_url = f"/v1/tasks/{name}/versions/{version.number}/parts"
    return VersionPartsPublic(
        task=name,
        version=version.number,
        consolidation_run_id=version.consolidation_run_id,
        composed_sha256=_composed_digest(store, version, name=name).sha256,
        parts=[
            VersionPartPublic(
                role=role, sha256=part.sha256, size_bytes=part.size_bytes, url=f"{base_url}/{role}"
            )
            for role, part in (("shared", shared), ("residual", residual))
        ],
    )


@router.get(
    "/{name}/versions/{number}/parts",
    response_model=VersionPartsPublic,
    responses=ERRORS,
    tags=CONSOLIDATIONS,
    summary="List a consolidated version's shared and residual diffs",
)
def list_version_parts(
    name: TaskNamePath,
    number: VersionNumberPath,
    principal: Annotated[Principal, Depends(require("tasks.read"))],
    session: SessionDep,
    store: StoreDep,
) -> VersionPartsPublic:
    """The factored layout: the shared diff and the task's residual, each an artifact."""
    version = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=number
    )
    return version_parts(version, name=name, session=session, store=store)


@router.get(
    "/{name}/versions/{number}/parts/{role}",
    response_class=StreamingResponse,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    tags=CONSOLIDATIONS,
    summary="Download one part of a consolidated version",
)
def download_version_part(
    name: TaskNamePath,
    number: VersionNumberPath,
    role: Literal["shared", "residual"],
    principal: Annotated[Principal, Depends(require("tasks.read"))],
    session: SessionDep,
    store: StoreDep,
) -> StreamingResponse:
    """The shared or residual artifact (the usual format), sha256-verified while streaming."""
    version = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=number
    )
    artifact = _part_artifact(version, role, name=name, session=session)
    headers = {
        "ETag": f'"{artifact.sha256}"',
        "X-Diffbank-Sha256": artifact.sha256,
        "Content-Length": str(artifact.size_bytes),
        "Content-Disposition": f'attachment; filename="{name}-v{number}-{role}.safetensors"',
    }
    return StreamingResponse(
        started(store.open(artifact.object_key, sha256=artifact.sha256)),
        headers=headers,
        media_type="application/octet-stream",
    )


def _part_artifact(version: TaskVersion, role: str, *, name: str, session) -> Artifact:
    """The stored shared or residual artifact of a consolidated version (409 without parts)."""
    _require_parts(version, name=name)
    artifact_id = version.shared_artifact_id if role == "shared" else version.residual_artifact_id
    with catalog.transaction(session):
        return session.get(Artifact, artifact_id)


# Predictions are a resource of their own (api/routes/predict.py), served under /tasks too.
router.include_router(predict.router)
