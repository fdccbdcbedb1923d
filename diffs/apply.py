"""Applying a sparse diff to a live model: in place on an encoder, its head, a standalone model.

A tensor with sparse entries only is changed at those entries (O(nnz)); a tensor with low-rank
factors (format version 2) gets its whole dense diff U Vᵀ + entries, so apply saves the whole
tensor for the bit-exact revert.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffs.basemodel import head_parameters
from diffs.types import ArtifactError, SparseDiff

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

    from diffs.basemodel import LoadedBase


@dataclass(eq=False)
class _ApplyPlan:
    """One diff's validated targets on one encoder, with reusable buffers for saved values."""

    params: list[torch.Tensor]
    flats: list[torch.Tensor]  # flat views of the parameters' storage
    indices: list[torch.Tensor | None]  # None: the whole tensor (a factored one)
    deltas: list[torch.Tensor]  # in the parameter's dtype and device
    buffers: list[torch.Tensor]  # where apply saves the overwritten base values
    buffers_in_use: bool = False

    def is_current(self) -> bool:
        """Whether every view still points at its parameter's storage."""
        return all(
            f.data_ptr() == p.data_ptr() for f, p in zip(self.flats, self.params, strict=True)
        )


class AppliedDiff:
    """A diff applied in place to an encoder; `revert()` restores the base bit for bit."""

    def __init__(self, plan: _ApplyPlan, saved: list[torch.Tensor], owns_buffers: bool) -> None:
        self._plan = plan
        self._saved = saved  # overwritten base values, one tensor per target
        self._owns_buffers = owns_buffers
        self.reverted = False

    def revert(self) -> None:
        """Put the overwritten base values back (a second call does nothing)."""
        if self.reverted:
            return
        plan = self._plan
        with torch.no_grad():
            for flat, idx, saved in reversed(
                list(zip(plan.flats, plan.indices, self._saved, strict=True))
            ):
                if idx is None:
                    flat.copy_(saved)
                else:
                    flat.scatter_(0, idx, saved)  # index_copy_ stalls on busy multi-core CPUs
        self.reverted = True
        if self._owns_buffers:
            plan.buffers_in_use = False

    def __enter__(self) -> AppliedDiff:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.revert()


def _apply_plan(encoder: nn.Module, diff: SparseDiff) -> _ApplyPlan:
    """The diff's targets in the encoder, validated once per (diff, encoder) and cached."""
    plan = diff.apply_plans.get(encoder)
    if plan is not None and plan.is_current():
        return plan
    params = dict(encoder.named_parameters())
    for name, shape in ((n, diff.shapes[n]) for n in diff.tensor_names):
        param = params.get(name)
        if param is None:
            raise ArtifactError(f"diff tensor {name!r} is not a parameter of the encoder")
        if tuple(param.shape) != tuple(shape):
            raise ArtifactError(
                f"shape of {name!r} is {tuple(shape)} in the diff but {tuple(param.shape)} "
                "in the encoder"
            )
        if not param.is_contiguous():
            raise ArtifactError(f"parameter {name!r} is not contiguous; cannot apply in place")
    plan = _ApplyPlan([], [], [], [], [])
    for name in diff.tensor_names:
        param = params[name]
        if name in diff.factors:
            idx = None
            delta = diff.dense(name).to(device=param.device, dtype=param.dtype).view(-1)
        else:
            idx, delta = diff.prepared(name, param.dtype, param.device)
        plan.params.append(param)
        plan.flats.append(param.detach().view(-1))
        plan.indices.append(idx)
        plan.deltas.append(delta)
        plan.buffers.append(torch.empty_like(delta))
    diff.apply_plans[encoder] = plan
    return plan


def apply_diff(encoder: nn.Module, diff: SparseDiff) -> AppliedDiff:
    """Add the diff to the encoder's parameters in place (base + delta in the base dtype).

    O(nnz) (a factored tensor: O(its size)), and after the first call on an encoder it
    allocates nothing. Several diffs
    may be stacked if reverted in reverse order. Not thread-safe: serialise task
    switches on one encoder.
    """
    plan = _apply_plan(encoder, diff)
    owns_buffers = not plan.buffers_in_use
    saved = plan.buffers if owns_buffers else [torch.empty_like(d) for d in plan.deltas]
    if owns_buffers:
        plan.buffers_in_use = True
    with torch.no_grad():
        for flat, idx, delta, buffer in zip(
            plan.flats, plan.indices, plan.deltas, saved, strict=True
        ):
            if idx is None:
                buffer.copy_(flat)
                flat.add_(delta)
                continue
            torch.index_select(flat, 0, idx, out=buffer)
            flat.scatter_add_(0, idx, delta)  # indices are unique: exactly base + delta
    return AppliedDiff(plan, saved, owns_buffers)


def install_head(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put `tensors` into the model as the parameters of those names (no copy); return the
    parameters they replaced, so a second call with those puts the previous head back."""
    previous = {}
    for name, tensor in tensors.items():
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        previous[name] = module._parameters[leaf]
        module._parameters[leaf] = tensor
    return previous


def load_head(model: PreTrainedModel, diff: SparseDiff) -> None:
    """Install the diff's head tensors as the model's non-base parameters (strictly), in the
    model's dtype and device."""
    own = head_parameters(model)
    if set(own) != set(diff.head):
        raise ArtifactError(
            f"head tensors {sorted(diff.head)} do not match the model's head {sorted(own)}"
        )
    for name, param in own.items():
        if tuple(param.shape) != tuple(diff.head[name].shape):
            raise ArtifactError(
                f"head tensor {name!r} has shape {tuple(diff.head[name].shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
    install_head(
        model,
        {
            name: torch.nn.Parameter(
                diff.head[name].to(device=param.device, dtype=param.dtype, copy=True),
                requires_grad=param.requires_grad,
            )
            for name, param in own.items()
        },
    )


def build_task_model(base: LoadedBase, diff: SparseDiff) -> PreTrainedModel:
    """A standalone classification model: base + diff merged, the diff's head, labels set."""
    from diffs.basemodel import build_model
    from diffs.validation import check_artifact

    check_artifact(diff, base)
    meta = diff.meta
    model = build_model(
        base,
        task_type=meta.task_type,
        num_labels=meta.num_labels,
        label_names=meta.label_names if meta.task_type != "regression" else None,
    )
    apply_diff(model.base_model, diff)  # merged for good: the AppliedDiff is dropped
    load_head(model, diff)
    model.eval()
    return model
