"""Predictions (`POST /tasks/{name}/predict`): requests of any tasks batched into mixed forwards.

The cheap path: the key's principal and the task's served version come from the per-process
registry caches (`api.cache`) without leaving the event loop; one thread-pool hop tokenises (and,
on a miss, reads the registry and fetches the diff); the answer is serialised once, here.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import Principal, require
from api.errors import ApiError, artifact_mismatch
from api.schemas import ROUTE_ERRORS, PredictionPublic, PredictionsPublic, PredictRequest
from registry import catalog
from serving.batcher import QueueFullError
from serving.engine import PredictionInputError, PreparedRequest
from serving.stages import mark, since

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
    version: Annotated[int | None, Query(ge=1, description="default: the active version")] = None,
) -> Response:
    """Classification answers `{"label", "score"}` per input, regression `{"value"}`."""
    from diffs.types import ArtifactError

    state = request.app.state
    settings = state.settings
    _check_limits(
        body, max_batch=settings.serving_max_batch, max_chars=settings.serving_max_text_chars
    )
    times: dict[str, tuple[float, float]] = {}
    auth_time = getattr(request.state, "auth_time", None)
    if auth_time is not None:
        times["auth"] = auth_time
    key = (principal.tenant_id, name, version)
    start = mark()
    served = state.served_versions.peek(key)
    peeked = since(start)
    # Fetching, verifying and decoding a missing diff runs off the event loop and off the
    # model runner, so requests for resident tasks keep flowing meanwhile.
    served, prepared, resolve_time, tokenise_time = await run_in_threadpool(
        _prepare, state, key, served, body.inputs
    )
    times["resolve"] = (peeked[0] + resolve_time[0], peeked[1] + resolve_time[1])
    times["tokenise"] = tokenise_time
    try:
        try:
            future = state.batcher.submit(prepared)
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
        raise artifact_mismatch(name, served.number, exc, cannot="served") from None
    start = mark()
    state.metrics.predictions.labels(served.task_type).inc(len(predictions))
    answer = PredictionsPublic(
        task=name,
        version=served.number,
        predictions=[PredictionPublic(**p) for p in predictions],
    )
    # Serialised once here (not re-validated by FastAPI), so its cost is the response stage.
    response = Response(answer.model_dump_json(exclude_none=True), media_type="application/json")
    times["response"] = since(start)
    state.stage_stats.add_request(times)
    return response


def _load_served(state, key: tuple[int, str, int | None]) -> catalog.ServedVersion:
    tenant_id, name, number = key
    with state.read_session_factory() as session:
        return catalog.resolve_served_version(
            session, tenant_id=tenant_id, name=name, number=number
        )


def _prepare(
    state, key: tuple[int, str, int | None], served: catalog.ServedVersion | None, inputs
) -> tuple[catalog.ServedVersion, PreparedRequest, tuple[float, float], tuple[float, float]]:
    """The served version, its resident diffs (shared first) and tokenised inputs; the
    (CPU, wall) seconds of resolving and of tokenising."""
    from diffs.types import ArtifactError

    predictor, store = state.predictor, state.store
    start = mark()
    if served is None:
        served = state.served_versions.get(key, lambda: _load_served(state, key))
    try:
        diffs = [
            predictor.resolve(
                served.base_source,
                sha256,
                lambda object_key=object_key, sha256=sha256: store.get(object_key, sha256=sha256),
            )
            for object_key, sha256 in served.artifacts
        ]
    except ArtifactError as exc:
        raise artifact_mismatch(key[1], served.number, exc, cannot="served") from None
    resolved = since(start)
    start = mark()
    try:
        prepared = predictor.prepare(served.base_source, diffs, inputs)
    except PredictionInputError as exc:
        raise ApiError(422, "invalid_inputs", str(exc), field="inputs") from None
    return served, prepared, resolved, since(start)
