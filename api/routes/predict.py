"""Predictions (`POST /tasks/{name}/predict`): a task's diff applied to the base, then reverted."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from api.deps import PredictorDep, ReadPrincipal, SessionDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.schemas import ROUTE_ERRORS, PredictionPublic, PredictionsPublic, PredictRequest
from api.serving import PredictionInputError
from registry import catalog

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
def predict(
    name: Annotated[str, Path(max_length=128)],
    body: PredictRequest,
    request: Request,
    principal: ReadPrincipal,
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
    task = catalog.get_task(session, tenant_id=principal.tenant_id, name=name)
    row = catalog.get_task_version(
        session, tenant_id=principal.tenant_id, name=name, number=version
    )
    artifact = row.artifact
    shared, residual = row.shared_artifact, row.residual_artifact
    try:
        if shared is not None and residual is not None:  # consolidated: shared stays applied
            predictions = predictor.predict_factored(
                base=task.base_model.source,
                shared_key=shared.sha256,
                fetch_shared=lambda: store.get(shared.object_key, sha256=shared.sha256),
                residual_key=residual.sha256,
                fetch_residual=lambda: store.get(residual.object_key, sha256=residual.sha256),
                inputs=body.inputs,
            )
        else:
            predictions = predictor.predict(
                base=task.base_model.source,
                diff_key=artifact.sha256,
                fetch=lambda: store.get(artifact.object_key, sha256=artifact.sha256),
                inputs=body.inputs,
            )
    except PredictionInputError as exc:
        raise ApiError(422, "invalid_inputs", str(exc), field="inputs") from None
    except ArtifactError as exc:
        raise ApiError(
            409,
            "artifact_mismatch",
            f"task {name!r} version {row.number} cannot be served: {exc}",
            field="version",
        ) from None
    request.app.state.metrics.predictions.labels(name).inc(len(predictions))
    return PredictionsPublic(
        task=name, version=row.number, predictions=[PredictionPublic(**p) for p in predictions]
    )
