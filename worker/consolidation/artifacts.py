"""Artifacts out of the fitted diff sets: the shared diff and each task's residual, as stored.

What is written is what the budget counts: an element-wise tensor's kept entries, and a factored
tensor's kept components as factors U (m x r) and V (n x r) (format version 2), never their
m x n product. So each artifact's `nnz` equals its set's `stored_entries()`. A task's composed
diff (shared + residual, `diffs.compose.compose_diffs`) is built in memory for evaluation
and is not published.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffs.apply import build_task_model
from diffs.basemodel import LoadedBase
from diffs.build import make_meta_consistent
from diffs.compose import compose_diffs
from diffs.types import VALUE_DTYPES, ArtifactMeta, SparseDiff
from worker.consolidation.config import (
    ConsolidationConfig,
    ConsolidationResult,
    ConsolidationTask,
    TaskOutcome,
)
from worker.consolidation.state import SHARED, GatedDiffSet
from worker.data import TaskData
from worker.kit.evaluate import evaluate
from worker.kit.model import resolve_device

Factors = dict[str, tuple[Tensor, Tensor]]


def materialise(diff_set: GatedDiffSet) -> tuple[dict[str, Tensor], dict[str, Tensor], Factors]:
    """A projected set as stored: (positions, fp32 values) per entry tensor, (U, V) per factored one."""
    indices: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    factors: Factors = {}
    with torch.no_grad():
        for name in diff_set.entry_names():
            positions, kept = diff_set.kept_entries(name)
            if positions.numel():
                indices[name] = positions.detach().to("cpu", torch.int64)
                values[name] = kept.detach().to("cpu", torch.float32)
        for name in diff_set.factor_names():
            u, v = diff_set.kept_factors(name)
            if u.shape[1]:
                factors[name] = (
                    u.detach().to("cpu", torch.float32),
                    v.detach().to("cpu", torch.float32),
                )
    return indices, values, factors


def make_artifact(
    indices: dict[str, Tensor],
    values: dict[str, Tensor],
    *,
    template: ArtifactMeta,
    head: dict[str, Tensor],
    shapes: dict[str, tuple[int, ...]],
    n_params: int,
    config: ConsolidationConfig,
    extra: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    factors: Factors | None = None,
) -> SparseDiff:
    """A SparseDiff of the usual format (version 2 with factors), lineage in meta.extra."""
    value_dtype = VALUE_DTYPES[config.value_dtype]
    factors = factors or {}
    meta = dataclasses.replace(
        template,
        n_params=n_params,
        value_dtype=config.value_dtype,
        config=config.to_dict(),
        metrics=dict(metrics or {}),
        extra={**dict(template.extra or {}), "consolidation": extra},
    )
    return make_meta_consistent(
        SparseDiff(
            indices=dict(indices),
            values={name: v.to(value_dtype) for name, v in values.items()},
            shapes={name: tuple(shapes[name]) for name in set(indices) | set(factors)},
            head={name: t.detach().float().cpu().clone() for name, t in head.items()},
            meta=meta,
            factors={
                name: (u.to(value_dtype), v.to(value_dtype)) for name, (u, v) in factors.items()
            },
        )
    )


def build_result(
    tasks: Sequence[ConsolidationTask],
    sets: dict[str, GatedDiffSet],
    heads: Sequence[dict[str, Tensor]],
    base_tensors: dict[str, Tensor],
    config: ConsolidationConfig,
    *,
    run_id: int | None,
    started: float,
    steps: int,
) -> ConsolidationResult:
    """Artifacts of the fitted sets: the shared diff and each task's residual (stored), and each
    task's composed diff (in memory, for evaluation)."""
    shapes = {name: tuple(t.shape) for name, t in base_tensors.items()}
    n_params = sum(t.numel() for t in base_tensors.values())
    shared_set = sets[SHARED]
    lineage = {"run_id": run_id, "strategy": config.strategy, "budget": config.budget}
    template = tasks[0].current.meta
    indices, values, factors = materialise(shared_set)
    shared = make_artifact(
        indices,
        values,
        template=template,
        head={},
        shapes=shapes,
        n_params=n_params,
        config=config,
        extra={**lineage, "role": "shared", "stored_entries": shared_set.stored_entries()},
        factors=factors,
    )
    outcomes = []
    for task, head in zip(tasks, heads, strict=True):
        residual_set = sets[task.name]
        entries = residual_set.stored_entries()
        r_idx, r_val, r_factors = materialise(residual_set)
        residual = make_artifact(
            r_idx,
            r_val,
            template=task.current.meta,
            head=head,
            shapes=shapes,
            n_params=n_params,
            config=config,
            extra={
                **lineage,
                "task": task.name,
                "role": "residual",
                "stored_entries": entries,
                "shared_stored_entries": shared_set.stored_entries(),
            },
            factors=r_factors,
        )
        outcomes.append(
            TaskOutcome(
                name=task.name,
                residual=residual,
                composed=compose_diffs(shared, residual),
                nnz=entries,
            )
        )
    total = shared_set.stored_entries() + sum(o.nnz for o in outcomes)
    return ConsolidationResult(
        shared=shared,
        shared_nnz=shared_set.stored_entries(),
        tasks=outcomes,
        total_nnz=total,
        train_seconds=time.monotonic() - started,
        steps=steps,
        config=config,
    )


def evaluate_diff(
    diff: SparseDiff, data: TaskData, *, base: LoadedBase, config: ConsolidationConfig
) -> dict:
    """Validation metrics of base + diff + its head (the trainer's evaluate)."""
    model = build_task_model(base, diff).to(resolve_device(config.device))
    return evaluate(
        model,
        data.validation,
        base=base,
        task_type=data.task_type,
        num_labels=data.num_labels,
        max_length=config.max_length,
        batch_size=config.eval_batch_size,
    )
