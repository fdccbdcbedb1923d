"""The learning-rate schedule of every method: linear warmup, then linear decay to zero."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear_warmup_decay(step: int, total: int, warmup: float) -> float:
    """The lr factor at `step` (0-based) of `total`: warmup over int(warmup·total) steps, then decay."""
    warmup_steps = int(warmup * total)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def set_learning_rates(
    optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float
) -> None:
    """Set each parameter group's lr to its base lr times the schedule factor."""
    for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base_lr * factor
