"""The model a method trains: device, autocast, a classification model over the shared base."""

from __future__ import annotations

import contextlib
import resource

import torch
from torch import nn

from diffs.basemodel import LoadedBase, build_model
from worker.data import TaskData


def resolve_device(requested: str) -> torch.device:
    """The configured device, or cuda when available, else cpu."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated bytes since the last reset. CPU: this process's RSS high-water mark."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def prepare_model(
    base: LoadedBase, data: TaskData, device: torch.device, *, share_base: bool
) -> nn.Module:
    """A classification model on `device` with a seeded fresh head and the base weights.

    With `share_base` (CPU only) the encoder's tensors are the cached base's own storage,
    frozen, so training holds one copy of θ₀, not two.
    """
    model = build_model(
        base,
        task_type=data.task_type,
        num_labels=data.num_labels,
        label_names=None if data.task_type == "regression" else data.label_names,
    )
    if share_base and device.type == "cpu":
        model.base_model.load_state_dict(base.encoder.state_dict(), assign=True)
    model.base_model.requires_grad_(not share_base)
    return model.to(device)
