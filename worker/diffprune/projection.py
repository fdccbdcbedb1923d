"""Global top-k projection of a dense diff onto exactly k entries."""

from __future__ import annotations

import torch
from torch import Tensor


def global_topk(magnitudes: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Sorted flat indices, per tensor, of the k largest magnitudes across all tensors.

    Tensors are concatenated in sorted-name order; among equal magnitudes at the
    threshold the lowest global flat index wins, so exactly k entries are kept.
    Tensors with no kept entry get an empty index tensor.
    """
    names = sorted(magnitudes)
    flat = torch.cat([magnitudes[name].detach().reshape(-1) for name in names])
    total = flat.numel()
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot project a diff with NaN or infinite entries")
    if k == total:
        keep = torch.ones(total, dtype=torch.bool, device=flat.device)
    elif k == 0:
        keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
    else:
        threshold_value = torch.kthvalue(flat, total - k + 1).values  # the k-th largest
        keep = flat > threshold_value
        missing = k - int(keep.sum())
        ties = torch.nonzero(flat == threshold_value).squeeze(1)[:missing]
        keep[ties] = True
    kept: dict[str, Tensor] = {}
    offset = 0
    for name in names:
        size = magnitudes[name].numel()
        kept[name] = torch.nonzero(keep[offset : offset + size]).squeeze(1)
        offset += size
    return kept


def project_topk(deltas: dict[str, Tensor], k: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Keep the k entries of largest |δ| globally: (indices, values) per tensor, values fp32."""
    kept = global_topk({name: delta.abs() for name, delta in deltas.items()}, k)
    values = {
        name: deltas[name].detach().reshape(-1)[index].float() for name, index in kept.items()
    }
    return kept, values


def densify(
    indices: dict[str, Tensor], values: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """Dense tensors holding `values` at `indices` and zeros elsewhere."""
    dense = {}
    for name, shape in shapes.items():
        out = torch.zeros(shape, dtype=torch.float32).reshape(-1)
        if name in indices and indices[name].numel():
            out[indices[name].cpu()] = values[name].detach().float().cpu()
        dense[name] = out.reshape(shape)
    return dense
