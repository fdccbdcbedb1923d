"""The optimizer every method uses for values and heads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def make_adamw(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW (tensors or parameter groups), fused where this torch build supports the device.

    `fused=False` keeps the for-each implementation, whose rounding differs from the fused one.
    """
    params = list(params)
    if not fused:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
