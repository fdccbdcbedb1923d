"""The reference kernel: plain torch, one dense correction per diff and row interval, added to
the base module's output. Every other kernel is tested against it row by row."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from serving.kernels.plan import FACTOR, ROW_START, ROW_STOP, SLOT, BatchPlan
from serving.resident import DecodedDiff, leaf_positions


def dense_leaf(diff: DecodedDiff, span: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A leaf's delta as a dense tensor shaped like `like` (zeros where unchanged)."""
    dense = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    if span[0] >= 0:
        positions, values = leaf_positions(diff, span)
        dense[positions] = values.to(like.dtype)
    return dense.view_as(like)


def correction(
    module: nn.Module, x: torch.Tensor, diff: DecodedDiff, name: str, plan: BatchPlan, factor: int
) -> torch.Tensor:
    """What `diff` adds to `module`'s output on input `x`."""
    delta = diff.modules[name]
    weight = dense_leaf(diff, delta.weight_span, module.weight)
    own_bias = getattr(module, "bias", None)
    bias = dense_leaf(diff, delta.bias_span, own_bias) if own_bias is not None else None
    if isinstance(module, nn.Linear):
        out = nn.functional.linear(x, weight, bias)
        if factor >= 0:
            out = out + (x @ plan.downs[factor]) @ plan.ups[factor].T
        return out
    if isinstance(module, nn.Embedding):
        return nn.functional.embedding(x, weight)
    normed = nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return normed * weight + (bias if bias is not None else 0)


def base_output(
    x: torch.Tensor, plan: BatchPlan, forward: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base module's output with a row per batch row (a table looked up once for every
    row, like position ids, is expanded into its own copy), and the input expanded alike."""
    out = forward(x)
    if out.shape[0] != plan.rows:
        out = out.expand(plan.rows, *out.shape[1:]).clone()
        x = x.expand(plan.rows, *x.shape[1:])
    return out, x


def run(
    name: str, module: nn.Module, x: torch.Tensor, plan: BatchPlan, forward: Callable
) -> torch.Tensor:
    """The module's output for the batch, each interval corrected by its diffs."""
    parts = plan.parts(name)
    out, x = base_output(x, plan, forward)
    for row in parts.tolist():
        if row[SLOT] < 0:
            continue
        rows = slice(row[ROW_START], row[ROW_STOP])
        out[rows] += correction(module, x[rows], plan.diffs[row[SLOT]], name, plan, row[FACTOR])
    return out
