"""Training-free consolidation: the tasks' current sparse diffs merged into one shared diff.

Strategies (as in Ilharco et al. 2023, Yadav et al. 2023, Yu et al. 2024 and PEFT's merge_utils),
with λ = `merge_weight`:
- ``task_arithmetic``: λ · Σ_t δ_t.
- ``ties``: trim each δ_t to its ⌈`ties_density` · nnz_t⌉ largest magnitudes, elect a sign per
  position (the sign of the summed trimmed values, + on a zero sum), average the values that
  agree with it (the disjoint mean), times λ.
- ``dare``: drop each entry with probability p = `dare_drop` (seeded by `seed`), rescale the
  survivors by 1 / (1 - p), sum, times λ.

The math runs tensor by tensor on the sorted sparse supports (concatenate, unique, index_add),
never densifying a task (a rank-strategy version's factored tensor is read by its sparse view,
`SparseDiff.sparse_entries`). With λ = 1, task arithmetic and DARE add an earlier
consolidation's shared part once per task (see docs/consolidation.md); TIES counts it once.
Positions whose merged value is exactly zero are not stored. The merged diff is projected to
the budget (largest magnitudes, ties by position); every task keeps its head, its residual is
empty, and its composed diff is the shared diff with its head, which the runner scores for
acceptance as it does for trained strategies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from diffs.basemodel import LoadedBase
from diffs.types import SparseDiff
from worker.consolidation.artifacts import make_artifact
from worker.consolidation.config import (
    ConsolidationConfig,
    ConsolidationError,
    ConsolidationResult,
    ConsolidationTask,
    TaskOutcome,
    validate_request,
)
from worker.diffprune.projection import global_topk

# tensor name -> (sorted flat int64 indices, fp32 values)
Entries = dict[str, tuple[Tensor, Tensor]]


def entries_of(diff: SparseDiff) -> Entries:
    """A diff's per-tensor (indices, fp32 values), its sparse view: a factored tensor (a
    rank-strategy version) gives its r·(m + n) largest entries of U Vᵀ plus its own entries."""
    entries = {name: diff.sparse_entries(name) for name in diff.tensor_names}
    return {name: pair for name, pair in entries.items() if pair[0].numel()}


def largest(entries: Entries, k: int) -> Entries:
    """The k entries of largest magnitude over all tensors (all when fewer; ties by position)."""
    if sum(int(idx.numel()) for idx, _ in entries.values()) <= k:
        return dict(entries)
    kept = global_topk({name: values.abs() for name, (_, values) in entries.items()}, k)
    return {
        name: (idx[kept[name]], values[kept[name]])
        for name, (idx, values) in entries.items()
        if kept[name].numel()
    }


def trimmed(entries: Entries, density: float) -> Entries:
    """TIES's trim: the ⌈density · nnz⌉ entries of largest magnitude."""
    return largest(entries, math.ceil(density * sum(int(i.numel()) for i, _ in entries.values())))


def dropped(entries: Entries, drop: float, generator: torch.Generator) -> Entries:
    """Each entry dropped with probability `drop`, survivors rescaled by 1 / (1 - drop)."""
    out: Entries = {}
    for name in sorted(entries):
        idx, values = entries[name]
        keep = torch.rand(idx.numel(), generator=generator) >= drop
        if bool(keep.any()):
            out[name] = (idx[keep], values[keep] / (1.0 - drop))
    return out


def merged_tensor(parts: Sequence[tuple[Tensor, Tensor]], strategy: str) -> tuple[Tensor, Tensor]:
    """One tensor's merged (indices, values) over the tasks' parts: the sum, or TIES's disjoint mean."""
    indices = torch.cat([idx for idx, _ in parts])
    values = torch.cat([v for _, v in parts])
    positions, slot = torch.unique(indices, sorted=True, return_inverse=True)
    total = torch.zeros(positions.numel()).index_add_(0, slot, values)
    if strategy == "ties":
        elected = torch.where(total >= 0, 1.0, -1.0)
        agrees = (torch.sign(values) == elected[slot]).float()
        agreeing_sum = torch.zeros(positions.numel()).index_add_(0, slot, values * agrees)
        agreeing_count = torch.zeros(positions.numel()).index_add_(0, slot, agrees)
        total = agreeing_sum / agreeing_count.clamp(min=1.0)
    nonzero = total != 0
    return positions[nonzero], total[nonzero]


def merge_entries(diffs: Sequence[SparseDiff], config: ConsolidationConfig) -> Entries:
    """The diffs merged by `config.strategy` and scaled by `merge_weight`, before any budget."""
    generator = torch.Generator().manual_seed(config.seed)
    per_task = []
    for diff in diffs:
        entries = entries_of(diff)
        if config.strategy == "ties":
            entries = trimmed(entries, config.ties_density)
        elif config.strategy == "dare":
            entries = dropped(entries, config.dare_drop, generator)
        elif config.strategy != "task_arithmetic":
            raise ConsolidationError(
                f"strategy {config.strategy!r} is not a merge strategy", field="strategy"
            )
        per_task.append(entries)
    merged: Entries = {}
    for name in sorted({name for entries in per_task for name in entries}):
        parts = [entries[name] for entries in per_task if name in entries]
        idx, values = merged_tensor(parts, config.strategy)
        if idx.numel():
            merged[name] = (idx, values * config.merge_weight)
    return merged


def tensor_shapes(diffs: Sequence[SparseDiff]) -> dict[str, tuple[int, ...]]:
    """Every diffed tensor's shape (the diffs must agree; they are on one base)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for diff in diffs:
        for name, shape in diff.shapes.items():
            if shapes.setdefault(name, tuple(shape)) != tuple(shape):
                raise ConsolidationError(f"tensor {name!r} has two shapes", field="tasks")
    return shapes


def merge_consolidate(
    tasks: Sequence[ConsolidationTask],
    config: ConsolidationConfig,
    *,
    base: LoadedBase,
    run_id: int | None = None,
) -> ConsolidationResult:
    """Merge the tasks' current diffs into one shared diff under the budget; heads kept, residuals empty."""
    validate_request(tasks, config, base=base)
    started = time.monotonic()
    diffs = [task.current for task in tasks]
    shapes = tensor_shapes(diffs)
    merged = merge_entries(diffs, config)
    shared_entries = largest(merged, config.budget)
    indices = {name: idx for name, (idx, _) in shared_entries.items()}
    values = {name: v for name, (_, v) in shared_entries.items()}
    shared_nnz = sum(int(idx.numel()) for idx in indices.values())
    lineage = {"run_id": run_id, "strategy": config.strategy, "budget": config.budget}

    def artifact(template, index, value, head, extra) -> SparseDiff:
        """A SparseDiff of the run with its lineage."""
        return make_artifact(
            index,
            value,
            template=template,
            head=head,
            shapes=shapes,
            n_params=base.n_params,
            config=config,
            extra={**lineage, **extra},
        )

    merged_entries = sum(int(idx.numel()) for idx, _ in merged.values())
    shared = artifact(
        tasks[0].current.meta,
        indices,
        values,
        {},
        {"role": "shared", "stored_entries": shared_nnz, "merged_entries": merged_entries},
    )
    outcomes = []
    for task in tasks:
        common = {"task": task.name, "shared_stored_entries": shared_nnz}
        meta, head = task.current.meta, task.current.head
        residual = artifact(meta, {}, {}, head, {**common, "role": "residual", "stored_entries": 0})
        composed = artifact(
            meta, indices, values, head, {**common, "role": "composed", "stored_entries": 0}
        )
        outcomes.append(TaskOutcome(name=task.name, residual=residual, composed=composed, nnz=0))
    return ConsolidationResult(
        shared=shared,
        shared_nnz=shared_nnz,
        tasks=outcomes,
        total_nnz=shared_nnz,
        train_seconds=time.monotonic() - started,
        steps=0,
        config=config,
    )
