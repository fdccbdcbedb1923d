"""Building a `SparseDiff`: from dense deltas, and its meta made consistent with its contents."""

from __future__ import annotations

import dataclasses

import torch

from diffs.types import VALUE_DTYPES, ArtifactError, ArtifactMeta, SparseDiff, file_version


def make_meta_consistent(diff: SparseDiff) -> SparseDiff:
    """Fill `meta.nnz`, `meta.density` and `meta.format_version` from the diff's contents."""
    nnz = diff.nnz
    diff.meta.nnz = nnz
    diff.meta.density = nnz / diff.meta.n_params if diff.meta.n_params else 0.0
    diff.meta.format_version = file_version(diff)
    return diff


def diff_from_dense(
    deltas: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    meta: ArtifactMeta,
    value_dtype: str = "float16",
) -> SparseDiff:
    """Build a SparseDiff from dense δ tensors, keeping their nonzero entries."""
    if value_dtype not in VALUE_DTYPES:
        raise ArtifactError(
            f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}"
        )
    indices: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in sorted(deltas):
        flat = deltas[name].detach().to("cpu").reshape(-1)
        nonzero = torch.nonzero(flat, as_tuple=True)[0]
        if nonzero.numel() == 0:
            continue
        indices[name] = nonzero.to(torch.int64)
        values[name] = flat[nonzero].to(VALUE_DTYPES[value_dtype])
        shapes[name] = tuple(deltas[name].shape)
    meta = dataclasses.replace(meta, value_dtype=value_dtype)
    head = {name: t.detach().to("cpu").contiguous() for name, t in head.items()}
    return make_meta_consistent(SparseDiff(indices, values, shapes, head, meta))
