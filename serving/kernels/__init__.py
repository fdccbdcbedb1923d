"""Kernels of the mixed forward; each runs one module for all row segments of a batch.

- `compiled`: CPU, a C++ extension patching each segment's diff into the weights (the default
  on CPU with fp32 weights);
- `triton`: CUDA, a Triton kernel adding every segment's sparse correction in one launch;
- `oracle`: plain torch, the reference the others are tested against (any device and dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

KERNELS = ("auto", "compiled", "triton", "oracle")
log = logging.getLogger(__name__)


def select_kernel(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """The (name, run function) of kernel `name` ("auto": the fastest that works here)."""
    if name not in KERNELS:
        raise ValueError(f"unknown serving kernel {name!r}; choose one of {', '.join(KERNELS)}")
    if name == "auto":
        if device.type == "cuda":
            name = "triton" if _triton_available() else "oracle"
        else:
            name = "compiled" if dtype == torch.float32 else "oracle"
    if name == "compiled":
        from serving.kernels import compiled

        try:
            compiled.extension()
        except Exception as exc:  # no compiler on this machine: the reference still serves
            log.warning("serving kernel 'compiled' is unavailable (%s); using 'oracle'", exc)
            name = "oracle"
        else:
            return name, compiled.run
    if name == "triton":
        from serving.kernels import triton_kernel

        return name, triton_kernel.run
    from serving.kernels import oracle

    return "oracle", oracle.run


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
