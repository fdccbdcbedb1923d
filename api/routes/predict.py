"""Predictions (`POST /tasks/{name}/predict`): requests of any tasks batched into mixed forwards."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from api.deps import (
    PredictorDep,
    Principal,
    SessionDep,
    SettingsDep,
    StoreDep,
    require,
)
from api.errors import ApiError
from api.schemas import ROUTE_ERRORS, PredictionPublic, PredictionsPublic, PredictRequest
from registry import catalog
from registry.compose import SINGLE, layout_of
from serving.batcher import QueueFullError
from serving.engine import PredictionInputError, Predictor, PreparedRequest

# Mounted under /tasks by the tasks router (api/routes/tasks.py).
router = APIRouter(tags=["predictions"])

ERRORS = ROUTE_ERRORS


def _check_limits(body: PredictRequest, *, max_batch: int, max_chars: int) -> None:
    """422 naming the input that breaks a limit."""
    if len(body.inputs) > max_batch:
        raise ApiError(
            422,
            "too_many_inputs",
            f"at most {max_batch} inputs per request, got {len(body.inputs)}",
            field="inputs",
        )
    for i, item in enumerate(body.inputs):
        texts = [item] if isinstance(item, str) else item
        for j, text in enumerate(texts):
            where = f"inputs.{i}" if isinstance(item, str) else f"inputs.{i}.{j}"
            if len(text) > max_chars:
                raise ApiError(
                    422,
                    "text_too_long",
                    f"{where} has {len(text)} characters; the limit is {max_chars}",
                    field=where,
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (e.g. "\ud800") are not text
                raise ApiError(
                    422, "invalid_text", f"{where} is not valid Unicode text", field=where
                ) from None


@router.post(
    "/{name}/predict",
    response_model=PredictionsPublic,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Predict with a task",
)
async def predict(
    name: Annotated[str, Path(max_length=128)],
    body: PredictRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("tasks.predict"))],
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    version: Annotated[int | None, Query(ge=1, description="default: the active version")] = None,
) -> PredictionsPublic:
    """Classification answers `{"label", "score"}` per input, regression `{"value"}`."""
    from registry.artifact import ArtifactError

    _check_limits(
        body, max_batch=settings.serving_max_batch, max_chars=settings.serving_max_text_chars
    )
    task = await run_in_threadpool(
        catalog.get_task, session, tenant_id=principal.tenant_id, name=name
    )
    row = await run_in_threadpool(
        catalog.get_task_version,
        session,
        tenant_id=principal.tenant_id,
        name=name,
        number=version,
    )
    try:
        # Fetching, verifying and decoding a missing diff runs off the event loop and off the
        # model runner, so requests for resident tasks keep flowing meanwhile.
        prepared = await run_in_threadpool(
            _prepare, predictor, store, task.base_model.source, row, body.inputs
        )
        try:
            future = request.app.state.batcher.submit(prepared)
        except QueueFullError as exc:
            raise ApiError(
                503,
                "overloaded",
                str(exc),
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from None
        predictions = await asyncio.wrap_future(future)
    except PredictionInputError as exc:
        raise ApiError(422, "invalid_inputs", str(exc), field="inputs") from None
    except ArtifactError as exc:
        raise ApiError(
            409,
            "artifact_mismatch",
            f"task {name!r} version {row.number} cannot be served: {exc}",
            field="version",
        ) from None
    request.app.state.metrics.predictions.labels(task.task_type).inc(len(predictions))
    return PredictionsPublic(
        task=name, version=row.number, predictions=[PredictionPublic(**p) for p in predictions]
    )


def _prepare(predictor: Predictor, store, base: str, row, inputs) -> PreparedRequest:
    """The version's resident diffs (shared first for a consolidated one) and tokenised inputs."""
    if layout_of(row) == SINGLE:
        artifacts = [row.artifact]
    else:
        artifacts = [row.shared_artifact, row.residual_artifact]
    diffs = [
        predictor.resolve(base, a.sha256, lambda a=a: store.get(a.object_key, sha256=a.sha256))
        for a in artifacts
    ]
    return predictor.prepare(base, diffs, inputs)
