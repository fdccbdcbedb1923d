"""Candidate positions of a task's residual: where the task's loss gradient is largest.

A residual lives on its current diff's positions plus up to `candidate_ratio` times as many
candidates: the positions outside the current diff with the largest |gradient| of the task's
loss w.r.t. the encoder weights, summed over `candidate_batches` batches at the task's current
version (base + current diff, current head, dropout off). Residuals are built one task at a
time, so the dense gradient is transient O(N) memory, never O(T·N).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from worker.diffprune import projection


def accumulated_gradient_magnitudes(
    weights: dict[str, Tensor],
    loss_of: Callable[[dict[str, Tensor], dict], Tensor],
    batches: Iterable[dict],
) -> dict[str, Tensor]:
    """Per tensor: the sum over `batches` of |d loss_of(weights, batch) / d weights| (fp32, dense)."""
    leaves = {name: w.detach().requires_grad_(True) for name, w in weights.items()}
    totals = {name: torch.zeros(w.shape, device=w.device) for name, w in weights.items()}
    for batch in batches:
        grads = torch.autograd.grad(
            loss_of(leaves, batch), list(leaves.values()), allow_unused=True
        )
        for total, grad in zip(totals.values(), grads, strict=True):
            if grad is not None:
                total.add_(grad.detach().float().abs())
    return totals


def candidate_count(current_entries: int, ratio: float) -> int:
    """How many candidates a residual with `current_entries` element-wise entries gets."""
    return math.ceil(current_entries * ratio) if ratio > 0 else 0


def pick_candidates(
    scores: dict[str, Tensor], current: dict[str, Tensor], count: int
) -> dict[str, Tensor]:
    """Sorted flat positions per tensor: the `count` largest positive scores outside `current`.

    One ranking over all tensors (ties: the lower position in sorted-name order); fewer than
    `count` when fewer positions have a nonzero score. `scores` is consumed (overwritten).
    """
    if not scores or count <= 0:
        return {}
    for name, score in scores.items():
        flat = torch.nan_to_num_(score.reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
        taken = current.get(name)
        if taken is not None and taken.numel():
            flat[taken.to(flat.device)] = 0.0
    eligible = sum(int((s > 0).sum()) for s in scores.values())
    kept = projection.global_topk(scores, min(count, eligible))
    return {name: index.to(torch.int64) for name, index in kept.items() if index.numel()}
