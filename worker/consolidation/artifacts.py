"""Sparse artifacts out of the fitted diff sets (shared, residual, composed) and their metrics."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from registry.apply import build_task_model
from registry.artifact import VALUE_DTYPES, ArtifactMeta, SparseDiff
from registry.basemodel import LoadedBase
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


def materialise(
    diff_sets: Sequence[GatedDiffSet], base_tensors: dict[str, Tensor]
) -> tuple[dict, dict]:
    """Sparse (indices, values) of the sum of masked sets: the union of their stored positions."""
    indices: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, theta in base_tensors.items():
            position_masks = []
            total = torch.zeros(theta.numel(), device=theta.device)
            for diff_set in diff_sets:
                if name in diff_set.w:
                    mask = diff_set.mask[name].flatten()
                    if not bool(mask.any()):
                        continue
                    position_masks.append(mask)
                    total += (diff_set.w[name] * diff_set.mask[name]).flatten()
                elif name in diff_set.u and bool(diff_set.mask[name].any()):
                    position_masks.append(
                        torch.ones(theta.numel(), dtype=torch.bool, device=theta.device)
                    )
                    total += diff_set.delta(name, "masked").flatten()
            if not position_masks:
                continue
            union = torch.stack(position_masks).any(dim=0)
            idx = torch.nonzero(union).flatten()
            indices[name] = idx.cpu()
            values[name] = total[idx].cpu()
    return indices, values


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
) -> SparseDiff:
    """A SparseDiff of the usual format with consolidation lineage in meta.extra."""
    nnz = sum(int(t.numel()) for t in indices.values())
    value_dtype = VALUE_DTYPES[config.value_dtype]
    meta = dataclasses.replace(
        template,
        density=nnz / n_params,
        nnz=nnz,
        value_dtype=config.value_dtype,
        config=config.to_dict(),
        metrics=dict(metrics or {}),
        extra={**dict(template.extra or {}), "consolidation": extra},
    )
    return SparseDiff(
        indices=dict(indices),
        values={name: v.to(value_dtype) for name, v in values.items()},
        shapes={name: tuple(shapes[name]) for name in indices},
        head={name: t.detach().float().cpu().clone() for name, t in head.items()},
        meta=meta,
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
    """Artifacts of the fitted sets: the shared diff, and per task its residual and composed diff."""
    shapes = {name: tuple(t.shape) for name, t in base_tensors.items()}
    n_params = sum(t.numel() for t in base_tensors.values())
    shared_set = sets[SHARED]
    lineage = {"run_id": run_id, "strategy": config.strategy, "budget": config.budget}
    template = tasks[0].current.meta
    indices, values = materialise([shared_set], base_tensors)
    shared = make_artifact(
        indices,
        values,
        template=template,
        head={},
        shapes=shapes,
        n_params=n_params,
        config=config,
        extra={**lineage, "role": "shared", "stored_entries": shared_set.stored_entries()},
    )
    outcomes = []
    for task, head in zip(tasks, heads, strict=True):
        residual_set = sets[task.name]
        entries = residual_set.stored_entries()
        common = {
            **lineage,
            "task": task.name,
            "stored_entries": entries,
            "shared_stored_entries": shared_set.stored_entries(),
        }
        r_idx, r_val = materialise([residual_set], base_tensors)
        residual = make_artifact(
            r_idx,
            r_val,
            template=task.current.meta,
            head=head,
            shapes=shapes,
            n_params=n_params,
            config=config,
            extra={**common, "role": "residual"},
        )
        c_idx, c_val = materialise([shared_set, residual_set], base_tensors)
        composed = make_artifact(
            c_idx,
            c_val,
            template=task.current.meta,
            head=head,
            shapes=shapes,
            n_params=n_params,
            config=config,
            extra={**common, "role": "composed"},
        )
        outcomes.append(
            TaskOutcome(name=task.name, residual=residual, composed=composed, nnz=entries)
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
