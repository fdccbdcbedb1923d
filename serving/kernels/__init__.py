"""Kernels of the mixed forward; each runs one module for all row segments of a batch.

- `compiled`: CPU, a C++ extension patching each segment's diff into the weights (the default
  on CPU with fp32 weights);
- `triton`: CUDA, a Triton kernel adding every segment's sparse correction in one launch (on
  CPU tensors only under TRITON_INTERPRET=1, for tests);
- `oracle`: plain torch, the reference the others are tested against (any device and dtype).

A kernel asked for by name that cannot run here is an error; only "auto" falls back to the
oracle (with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

KERNELS = ("auto", "compiled", "triton", "oracle")
log = logging.getLogger(__name__)


class KernelUnavailableError(RuntimeError):
    """A serving kernel asked for by name cannot run on this machine, device or dtype."""


def select_kernel(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """The (name, run function) of kernel `name` ("auto": the fastest that works here)."""
    if name not in KERNELS:
        raise ValueError(f"unknown serving kernel {name!r}; choose one of {', '.join(KERNELS)}")
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        elif dtype == torch.float32:
            name = "compiled"
        else:
            name = "oracle"
        if name != "oracle":
            try:
                return name, _load(name, device, dtype)
            except KernelUnavailableError as exc:
                log.warning("%s; using serving kernel 'oracle'", exc)
        from serving.kernels import oracle

        return "oracle", oracle.run
    return name, _load(name, device, dtype)


def _load(name: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The run function of kernel `name`, or KernelUnavailableError saying why it cannot run."""
    if name == "compiled":
        if device.type != "cpu" or dtype != torch.float32:
            raise KernelUnavailableError(
                f"serving kernel 'compiled' runs on CPU with float32 weights, not {device.type} "
                f"with {dtype}"
            )
        from serving.kernels import compiled

        try:
            compiled.extension()
        except Exception as exc:  # no compiler on this machine
            raise KernelUnavailableError(
                f"serving kernel 'compiled' is unavailable: building its C++ extension failed "
                f"({exc})"
            ) from exc
        return compiled.run
    if name == "triton":
        try:
            from serving.kernels import triton_kernel
        except ImportError as exc:
            raise KernelUnavailableError(f"serving kernel 'triton' is unavailable: {exc}") from exc
        if device.type != "cuda" and not triton_kernel.INTERPRETED:
            raise KernelUnavailableError(
                f"serving kernel 'triton' needs a CUDA device, not {device.type} "
                "(or TRITON_INTERPRET=1 before it is imported, to interpret it on CPU)"
            )
        return triton_kernel.run
    from serving.kernels import oracle

    return oracle.run
