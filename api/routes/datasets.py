"""Datasets: upload (streamed, size-limited, validated), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.deps import (
    CursorQuery,
    PageLimitQuery,
    Principal,
    SessionDep,
    SettingsDep,
    StoreDep,
    require,
)
from api.errors import ApiError
from api.schemas import DatasetPublic, DatasetsPublic, error_responses
from api.uploads import FILE_FIELD, receive_upload
from datasets_io import tabular
from registry import catalog
from registry.models import Dataset
from registry.publish import store_dataset

router = APIRouter(prefix="/datasets", tags=["datasets"])

ERRORS = error_responses(401, 403, 404, 409, 413, 415, 422)
MAPPING_FIELDS = ("text_field", "text_pair_field", "label_field", "task_type")

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "A .jsonl, .csv or .parquet file.",
                        },
                        "text_field": {"type": "string", "default": "text"},
                        "text_pair_field": {"type": "string"},
                        "label_field": {"type": "string", "default": "label"},
                        "task_type": {"type": "string", "enum": list(tabular.TASK_TYPES)},
                    },
                }
            }
        },
    }
}


def _mapping(fields: dict[str, str]) -> tuple[tabular.ColumnMapping, str | None]:
    """The column mapping and task type of an upload's form fields; 422 naming a bad field."""
    unknown = sorted(set(fields) - set(MAPPING_FIELDS))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown form field {unknown[0]!r}", field=unknown[0])
    for name in MAPPING_FIELDS:
        if name in fields and not fields[name].strip():
            raise ApiError(422, "validation_error", f"{name} must not be empty", field=name)
    task_type = fields.get("task_type")
    if task_type is not None and task_type not in tabular.TASK_TYPES:
        raise ApiError(
            422,
            "invalid_task_type",
            f"task_type must be one of {', '.join(tabular.TASK_TYPES)}",
            field="task_type",
        )
    mapping = tabular.ColumnMapping(
        text_field=fields.get("text_field", "text"),
        text_pair_field=fields.get("text_pair_field"),
        label_field=fields.get("label_field", "label"),
    )
    return mapping, task_type


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="Upload a dataset",
)
async def upload_dataset(
    request: Request,
    principal: Annotated[Principal, Depends(require("datasets.upload"))],
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> DatasetPublic:
    """Stream the file (size limit enforced while reading), validate it, store blob then row."""
    upload = await receive_upload(
        request, max_bytes=settings.max_upload_bytes, tmp_dir=request.app.state.upload_dir
    )
    try:
        mapping, task_type = _mapping(upload.fields)
        filename = upload.filename or ""
        table = await run_in_threadpool(
            tabular.read_table,
            upload.path,
            filename=filename,
            mapping=mapping,
            task_type=task_type,
            limits=tabular.TableLimits.from_settings(settings),
        )
        if await request.is_disconnected():  # nobody is waiting for it: create nothing
            raise ApiError(499, "client_gone", "the client left before the upload was stored")
        row = await run_in_threadpool(
            _publish_dataset,
            session,
            store,
            tenant_id=principal.tenant_id,
            upload_path=upload.path,
            filename=filename,
            table=table,
        )
    finally:
        upload.discard()
    return DatasetPublic.model_validate(row)


def _publish_dataset(
    session, store, *, tenant_id: int, upload_path, filename: str, table
) -> Dataset:
    """Blob -> verify -> row (registry write order)."""
    return store_dataset(
        session,
        store,
        tenant_id=tenant_id,
        data=upload_path.read_bytes(),
        filename=filename,
        format=tabular.format_of(filename),
        rows=table.rows,
        label_names=table.label_names,
        task_type=table.task_type,
        column_mapping={
            "text_field": table.mapping.text_field,
            "text_pair_field": table.mapping.text_pair_field,
            "label_field": table.mapping.label_field,
        },
    )


@router.get("", response_model=DatasetsPublic, responses=ERRORS, summary="List datasets")
def list_datasets(
    principal: Annotated[Principal, Depends(require("datasets.read"))],
    session: SessionDep,
    cursor: CursorQuery = None,
    limit: PageLimitQuery = 50,
) -> DatasetsPublic:
    """The caller's datasets, newest first, with a cursor for the next page."""
    rows, next_cursor = catalog.list_datasets(
        session, tenant_id=principal.tenant_id, cursor=cursor, limit=limit
    )
    return DatasetsPublic(
        items=[DatasetPublic.model_validate(r) for r in rows], next_cursor=next_cursor
    )


@router.get(
    "/{dataset_id}", response_model=DatasetPublic, responses=ERRORS, summary="Get a dataset"
)
def get_dataset(
    dataset_id: int,
    principal: Annotated[Principal, Depends(require("datasets.read"))],
    session: SessionDep,
) -> DatasetPublic:
    """One of the caller's datasets (another tenant's id answers 404)."""
    return DatasetPublic.model_validate(
        catalog.get_dataset(session, tenant_id=principal.tenant_id, dataset_id=dataset_id)
    )


@router.delete("/{dataset_id}", status_code=204, responses=ERRORS, summary="Delete a dataset")
def delete_dataset(
    dataset_id: int,
    principal: Annotated[Principal, Depends(require("datasets.delete"))],
    session: SessionDep,
    store: StoreDep,
) -> Response:
    """Delete a dataset (409 while an unfinished job uses it); its blob goes if unshared."""
    catalog.delete_dataset(session, store, tenant_id=principal.tenant_id, dataset_id=dataset_id)
    return Response(status_code=204)
