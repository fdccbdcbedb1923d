"""Which device a worker process trains on, and pinning a worker to one GPU."""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from settings import Settings

_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def pin_visible_gpu(settings: Settings, environ: MutableMapping[str, str] = os.environ) -> str:
    """Restrict this process to the GPU named by `worker_device` before CUDA initialises.

    `cuda:N` sets CUDA_VISIBLE_DEVICES=N (unless the operator already set it), so the worker
    sees exactly one GPU, which is then `cuda:0` inside the process. Returns the device string
    to train on afterwards. Imports no torch.
    """
    requested = settings.worker_device.strip()
    match = _CUDA_INDEX.match(requested)
    if match is None:
        return requested
    environ.setdefault("CUDA_VISIBLE_DEVICES", match.group(1))
    return _in_process_device(requested, environ)


def _in_process_device(requested: str, environ: MutableMapping[str, str]) -> str:
    """`cuda:N` as seen inside a process whose CUDA_VISIBLE_DEVICES may already be exactly N."""
    match = _CUDA_INDEX.match(requested)
    if match and environ.get("CUDA_VISIBLE_DEVICES", "").strip() == match.group(1):
        return "cuda:0"  # the one visible GPU
    return requested


def select_device(settings: Settings) -> str:
    """The torch device string to train on: the configured one, else cuda when present, else cpu."""
    import torch

    requested = settings.worker_device.strip()
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"DIFFBANK_WORKER_DEVICE={requested!r} but no CUDA device is visible to this worker"
            )
        return _in_process_device(requested, os.environ)
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
