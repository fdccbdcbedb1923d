"""The rank strategy of consolidation: low-rank diff factors and their scores.

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
