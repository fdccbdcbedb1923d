"""What a well-formed diff is: the rules the writer and the reader both keep (meta fields,
counts, entries, factors, shapes against a base, finite values)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from diffs.basemodel import TASK_TYPES
from diffs.types import (
    FORMAT_VERSIONS,
    MAX_UNCHECKED_FACTORED,
    VALUE_DTYPES,
    ArtifactError,
    ArtifactMeta,
    SparseDiff,
    file_version,
)

# Exponent bits of each float format: all ones means infinity or NaN.
_EXPONENT_MASKS = {
    torch.float16: (np.uint16, 0x7C00),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float32: (np.uint32, 0x7F800000),
    torch.float64: (np.uint64, 0x7FF0000000000000),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in a float tensor."""
    # Checked with numpy on the exponent bits: torch.isfinite stalls on busy multi-core CPUs.
    if tensor.dtype not in _EXPONENT_MASKS:
        return bool(torch.isfinite(tensor).all())
    unsigned, mask = _EXPONENT_MASKS[tensor.dtype]
    bits = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().view(unsigned)
    return not bool(np.any((bits & unsigned(mask)) == unsigned(mask)))


def check_diff(diff: SparseDiff) -> None:
    """Refuse to write a diff that a reader would reject."""
    meta = diff.meta
    check_meta(meta)
    if set(diff.indices) != set(diff.values) or not set(diff.indices) <= set(diff.shapes):
        raise ArtifactError("indices, values and shapes must name the same tensors")
    value_dtype = VALUE_DTYPES[meta.value_dtype]
    for name, idx in diff.indices.items():
        vals = diff.values[name]
        numel = math.prod(diff.shapes[name])
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise ArtifactError(f"indices of {name!r} must be a 1-D int64 tensor")
        if vals.dtype != value_dtype or vals.shape != idx.shape:
            raise ArtifactError(
                f"values of {name!r} must be {meta.value_dtype} with {idx.numel()} entries"
            )
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
            raise ArtifactError(f"indices of {name!r} out of bounds for shape {diff.shapes[name]}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ArtifactError(f"indices of {name!r} must be sorted and unique")
        if not all_finite(vals):
            raise ArtifactError(f"values of {name!r} contain NaN or infinity")
    check_diff_factors(diff)
    if meta.nnz != diff.nnz:
        raise ArtifactError(f"meta.nnz is {meta.nnz} but the diff holds {diff.nnz} nonzeros")
    if meta.format_version != file_version(diff):
        raise ArtifactError(
            f"meta.format_version is {meta.format_version}, a diff "
            f"{'with' if diff.factors else 'without'} factors is version {file_version(diff)}"
        )
    check_counts(meta, sum(math.prod(diff.shapes[name]) for name in diff.tensor_names))
    for name, tensor in diff.head.items():
        if not tensor.is_floating_point() or not all_finite(tensor):
            raise ArtifactError(f"head tensor {name!r} must be finite floating point")


def check_factors(
    name: str,
    pair: tuple[torch.Tensor, torch.Tensor],
    shape: tuple[int, ...],
    value_dtype: torch.dtype | None = None,
) -> None:
    """Factors (U m x r, V n x r) of an m x n tensor: 2-D, one rank, finite, one float dtype."""
    if len(shape) != 2:
        raise ArtifactError(f"factors of {name!r}: tensor of shape {tuple(shape)} is not a matrix")
    u, v = pair
    m, n = shape
    if (
        u.dim() != 2
        or v.dim() != 2
        or u.shape[0] != m
        or v.shape[0] != n
        or u.shape[1] != v.shape[1]
    ):
        raise ArtifactError(
            f"factors of {name!r} have shapes U {tuple(u.shape)}, V {tuple(v.shape)}; "
            f"a {m}x{n} matrix needs U ({m}, r) and V ({n}, r)"
        )
    if value_dtype is not None and (u.dtype != value_dtype or v.dtype != value_dtype):
        raise ArtifactError(
            f"factors of {name!r} must be {str(value_dtype).removeprefix('torch.')}, "
            f"got {str(u.dtype).removeprefix('torch.')}/{str(v.dtype).removeprefix('torch.')}"
        )
    if not u.is_floating_point() or not all_finite(u) or not all_finite(v):
        raise ArtifactError(f"factors of {name!r} contain NaN or infinity")


def check_diff_factors(diff: SparseDiff) -> None:
    """Every factor pair of a diff names a tensor with a shape and is well formed."""
    value_dtype = VALUE_DTYPES.get(diff.meta.value_dtype)
    for name, pair in diff.factors.items():
        if name not in diff.shapes:
            raise ArtifactError(f"factors of {name!r} have no shape")
        check_factors(name, pair, diff.shapes[name], value_dtype)


def check_base_shapes(
    shapes: Iterable[tuple[str, tuple[int, ...]]], base_shapes: dict[str, tuple[int, ...]]
) -> None:
    """Every (name, shape) of a diff's tensors exists in the base with that shape."""
    for name, shape in shapes:
        if name not in base_shapes:
            raise ArtifactError(f"diff tensor {name!r} does not exist in the base")
        if tuple(base_shapes[name]) != tuple(shape):
            raise ArtifactError(
                f"shape of {name!r} is {tuple(shape)} in the diff but {tuple(base_shapes[name])} "
                "in the base"
            )


def check_factored_sizes(factored: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """Without a base to check shapes against: no factored matrix above MAX_UNCHECKED_FACTORED."""
    # U Vᵀ of a claimed shape is what dense() allocates; a small file must not claim 2**40 floats.
    for name, (m, n) in factored:
        if m * n > MAX_UNCHECKED_FACTORED:
            raise ArtifactError(
                f"factors of {name!r} claim a {m}x{n} matrix ({m * n} entries), more than the "
                f"{MAX_UNCHECKED_FACTORED} a diff read without its base may have; read it with "
                "the base to check its shapes"
            )


def check_meta(meta: ArtifactMeta) -> None:
    """Field-level rules of ArtifactMeta."""
    if meta.format_version not in FORMAT_VERSIONS:
        raise ArtifactError(f"unsupported meta.format_version {meta.format_version}")
    if meta.value_dtype not in VALUE_DTYPES:
        raise ArtifactError(
            f"meta.value_dtype must be one of {sorted(VALUE_DTYPES)}, got {meta.value_dtype!r}"
        )
    if meta.task_type not in TASK_TYPES:
        raise ArtifactError(f"meta.task_type must be one of {TASK_TYPES}, got {meta.task_type!r}")
    if not all(isinstance(label, str) for label in meta.label_names):
        raise ArtifactError("meta.label_names must be strings")
    if meta.task_type != "regression" and len(meta.label_names) < 2:
        raise ArtifactError("meta.label_names must name at least two labels for classification")
    if len(set(meta.label_names)) != len(meta.label_names):
        raise ArtifactError("meta.label_names must be unique")
    if not 0 <= meta.n_params < 2**62 or meta.nnz < 0 or meta.max_length <= 0:
        raise ArtifactError(
            "meta.n_params (below 2**62), meta.nnz and meta.max_length must be non-negative"
        )


def check_counts(meta: ArtifactMeta, diff_entries: int) -> None:
    """The diff's tensors fit in n_params and meta.density is nnz / n_params."""
    if diff_entries > meta.n_params:
        raise ArtifactError(
            f"diff tensors hold {diff_entries} entries, more than meta.n_params {meta.n_params}"
        )
    expected = meta.nnz / meta.n_params if meta.n_params else 0.0
    if not math.isclose(meta.density, expected, rel_tol=1e-9, abs_tol=1e-15):
        raise ArtifactError(f"meta.density {meta.density} does not equal nnz / n_params")
