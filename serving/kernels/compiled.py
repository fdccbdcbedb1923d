"""The CPU kernel: a torch C++ extension (segmented.cpp) that runs one module for every row
segment of a batch in one call, each segment with its diff patched into the weights and then
restored; the products are torch's own dense kernels, so one task costs what a merged model does.

Built on first use with torch's JIT extension builder (g++ and ninja; cached per machine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serving.kernels.plan import BatchPlan

SOURCE = Path(__file__).with_name("segmented.cpp")
KINDS = {nn.Linear: 0, nn.Embedding: 1, nn.LayerNorm: 2}
_lock = threading.Lock()
_extension: Any = None


def extension() -> Any:
    """The compiled extension module (built and cached on first call)."""
    global _extension
    with _lock:
        if _extension is None:
            from torch.utils.cpp_extension import load

            _extension = load(
                name="diffbank_segmented",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
        return _extension


def _output_shape(module: nn.Module, x: torch.Tensor, rows: int) -> tuple[int, ...]:
    if isinstance(module, nn.Linear):
        return (rows, *x.shape[1:-1], module.out_features)
    if isinstance(module, nn.Embedding):
        return (rows, *x.shape[1:], module.embedding_dim)
    return (rows, *x.shape[1:])


def run(
    name: str, module: nn.Module, x: torch.Tensor, plan: BatchPlan, forward: Callable
) -> torch.Tensor:
    """The module's output for the batch, every segment with its own diffs, in one call."""
    parts = plan.parts(name)
    x = x.contiguous()
    dtype = module.weight.dtype
    out = torch.empty(_output_shape(module, x, plan.rows), dtype=dtype, device=x.device)
    padding = getattr(module, "padding_idx", None)
    extension().segmented_forward(
        next(kind for cls, kind in KINDS.items() if isinstance(module, cls)),
        out,
        x,
        module.weight,
        module.bias if getattr(module, "bias", None) is not None else None,
        float(getattr(module, "eps", 0.0)),
        -1 if padding is None else int(padding),
        parts,
        plan.blocks,
        plan.lows,
        plan.values,
        plan.ups,
        plan.downs,
    )
    return out
