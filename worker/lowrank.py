"""The rank strategy of consolidation: low-rank diff factors and the budget projection over them.

A weight matrix diff is stored as factors ``U diag(g) V^T`` (U: m x r, V: n x r) with one L0 gate
per rank-one component. A kept component of an m x n matrix costs ``m + n`` stored entries.
Which tensors are factored: every 2-D weight of the transformer layers and the pooler. Embedding
tables and 1-D tensors (biases, LayerNorm) stay element-wise (one gate per entry, cost 1): an
embedding diff touches few rows, which a low-rank factor cannot express cheaply, and the
cost-1 entries are what lets the projection fill the budget exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_factored(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the rank strategy stores this base tensor's diff as low-rank factors."""
    return len(shape) == 2 and not name.startswith("embeddings.")


def component_cost(shape: tuple[int, ...]) -> int:
    """Stored entries of one rank-one component of a matrix of this shape (m + n)."""
    return int(shape[0]) + int(shape[1])


def factors_from_dense(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` factors (U, V) of a dense matrix diff, balanced by sqrt of the singular values."""
    m, n = delta.shape
    rank = min(rank, m, n)
    if not torch.any(delta):
        return delta.new_zeros(m, rank), delta.new_zeros(n, rank)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


def lowrank_product(u: Tensor, v: Tensor, gate: Tensor) -> Tensor:
    """The dense matrix ``U diag(gate) V^T``."""
    return (u * gate) @ v.T


def component_scores(u: Tensor, v: Tensor, gate: Tensor) -> Tensor:
    """Per-component score comparable to an entry magnitude: ||g u v^T||_F / sqrt(cost)."""
    cost = u.shape[0] + v.shape[0]
    return gate.abs() * u.norm(dim=0) * v.norm(dim=0) / cost**0.5


def knapsack_topk(scores: Tensor, costs: Tensor, budget: int) -> Tensor:
    """Keep items by descending score (ties: lower index first) while they fit; exact when cost-1 items remain.

    Greedy over all items at once: an item that no longer fits is skipped and later, cheaper
    items still fill the remainder. Returns a bool mask over the items.
    """
    if scores.numel() != costs.numel():
        raise ValueError("scores and costs must have the same length")
    order = _stable_descending(scores)
    sorted_costs = costs[order].to(torch.int64)
    keep_sorted = torch.zeros_like(sorted_costs, dtype=torch.bool)
    big = sorted_costs > 1
    # Cost-1 items never overshoot, so only the expensive ones need the sequential greedy.
    used = 0
    big_positions = torch.nonzero(big).flatten().tolist()
    one_positions = torch.nonzero(~big).flatten()
    # Walk expensive items in order; cost-1 items ahead of each expensive item are taken first.
    ones_taken = 0
    for pos in big_positions:
        ones_before = int(torch.searchsorted(one_positions, pos))
        take_ones = min(ones_before - ones_taken, budget - used)
        used += take_ones
        ones_taken += take_ones
        if used >= budget:
            break
        cost = int(sorted_costs[pos])
        if used + cost <= budget:
            keep_sorted[pos] = True
            used += cost
    remaining = budget - used
    if remaining > 0:
        ones_taken = min(ones_taken + remaining, one_positions.numel())
    keep_sorted[one_positions[:ones_taken]] = True
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask


def _stable_descending(scores: Tensor) -> Tensor:
    """Indices sorting scores descending, ties by ascending index (deterministic)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices
