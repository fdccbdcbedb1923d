"""The sparse-diff artifact format: its constants, `SparseDiff` and `ArtifactMeta`.

One safetensors file per task version; written by `diffs.write`, read by `diffs.read`, both
keeping the rules of `diffs.checks`.

File layout (format version 1, every diff without factors):

- `diff.index_low`, `diff.index_high` (uint8): one Elias–Fano stream over the global index
  space formed by concatenating the flat base tensors listed in the `layout` metadata
  (only tensors with nonzeros, in sorted-name order);
- `diff.values` (float16 | bfloat16 | float32): the values, in the same global order;
- `head.<name>`: the dense task-head tensors;
- `__metadata__`: `format`, `format_version`, `index_coding`, `layout` (JSON
  `[[name, shape, nnz], ...]`), `meta` (JSON of `ArtifactMeta`) and `sha256`, a digest of
  the whole file with the digest's own 64 characters read as zeros, so any changed byte
  is caught.

Format version 2 (a diff with low-rank factors, the rank strategy of consolidation) adds, for
each factored matrix W (m x n) whose diff is U Vᵀ plus any entries of W in the stream above:

- `factor.<name>.u` (m x r) and `factor.<name>.v` (n x r), in the values' dtype;
- `factors` in `__metadata__`: JSON `[[name, [m, n], r], ...]` (sorted names, r >= 1).

So what is stored is what a budget counts: r·(m + n) values per factored matrix, never the
m·n product. `nnz` counts stored values: sparse entries plus factor values. Version 1 files
are still read, and a diff without factors is always written as version 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "diffbank.sparse-diff"
FORMAT_VERSION = 1  # the version of a diff without factors
FACTORS_FORMAT_VERSION = 2
FORMAT_VERSIONS = (FORMAT_VERSION, FACTORS_FORMAT_VERSION)
INDEX_CODING = "elias-fano"
VALUE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
INDEX_LOW_KEY = "diff.index_low"
INDEX_HIGH_KEY = "diff.index_high"
VALUES_KEY = "diff.values"
HEAD_PREFIX = "head."
FACTOR_PREFIX = "factor."
MAX_HEADER_BYTES = 100 * 1024 * 1024
# m·n of one factored matrix in a diff read without its base: 2**26 (256 MiB as fp32) is 16x
# BERT-large's largest linear layer (4096 x 1024).
MAX_UNCHECKED_FACTORED = 2**26


class ArtifactError(ValueError):
    """A sparse-diff artifact is invalid or does not fit the base in use; the message says why."""


@dataclass
class ArtifactMeta:
    """Everything stored about a diff besides its tensors."""

    base_name: str
    base_fingerprint: str
    n_params: int
    task_type: str
    label_names: list[str] = field(default_factory=list)
    max_length: int = 128
    text_field: str = "text"
    text_pair_field: str | None = None
    value_dtype: str = "float16"
    density: float = 0.0
    nnz: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """Sorted, compact JSON of the metadata."""
        return json.dumps(
            dataclasses.asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False
        )

    @property
    def num_labels(self) -> int:
        """Outputs of the task head: 1 for regression, else the number of labels."""
        return 1 if self.task_type == "regression" else len(self.label_names)


@dataclass(eq=False)
class SparseDiff:
    """A task as sparse per-tensor deltas against the base plus a dense head."""

    indices: dict[str, torch.Tensor]  # int64, flat, strictly increasing
    values: dict[str, torch.Tensor]  # meta.value_dtype, same lengths
    shapes: dict[str, tuple[int, ...]]
    head: dict[str, torch.Tensor]
    meta: ArtifactMeta
    # Low-rank factors (U m x r, V n x r, meta.value_dtype) of factored matrices: delta = U Vᵀ
    # (+ the tensor's entries, if any). Empty for ordinary diffs.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Caches for diffs.apply.apply_diff: (name, dtype, device) -> values, (name, device)
    # -> indices (`prepared`), and `apply_plans`: per encoder the validated list of targets
    # (written by diffs.apply). A diff is not to be mutated once applied.
    _prepared: dict[tuple, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    apply_plans: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False
    )

    @property
    def entry_count(self) -> int:
        """Sparse entries over all tensors (positions in the index stream)."""
        return sum(int(t.numel()) for t in self.indices.values())

    @property
    def factor_values(self) -> int:
        """Stored factor values: r·(m + n) per factored matrix."""
        return sum(int(u.numel()) + int(v.numel()) for u, v in self.factors.values())

    @property
    def nnz(self) -> int:
        """Stored values: sparse entries plus factor values (what a budget counts)."""
        return self.entry_count + self.factor_values

    @property
    def tensor_names(self) -> list[str]:
        """Every base tensor the diff changes (by entries, factors or both), sorted."""
        return sorted(set(self.indices) | set(self.factors))

    def dense(self, name: str) -> torch.Tensor:
        """The fp32 dense diff of one tensor: U Vᵀ plus its entries (CPU)."""
        shape = self.shapes[name]
        if name in self.factors:
            u, v = self.factors[name]
            dense = (u.detach().cpu().float() @ v.detach().cpu().float().T).reshape(-1)
        else:
            dense = torch.zeros(math.prod(shape))
        if name in self.indices:
            dense.index_add_(0, self.indices[name].cpu(), self.values[name].cpu().float())
        return dense.view(shape)

    def sparse_entries(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat int64 positions, fp32 values) of one tensor's diff, never densified whole.

        An entry-only tensor gives its stored entries. A factored tensor (m x n, rank r) gives
        the r·(m + n) largest-magnitude nonzeros of U Vᵀ (as many as it stores; ties by
        position), found a block of rows at a time, plus its own entries; values U Vᵀ + entries.
        """
        if name in self.indices:
            positions = self.indices[name].to(torch.int64)
            values = self.values[name].float()
        else:
            positions, values = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        if name not in self.factors:
            return positions, values
        u, v = (f.detach().cpu().float() for f in self.factors[name])
        n, keep = v.shape[0], u.shape[1] * (u.shape[0] + v.shape[0])
        rows = max(1, (1 << 20) // max(n, 1))  # rows of U Vᵀ per block: bounds the product
        top, top_abs, cutoff = np.zeros(0, np.int64), np.zeros(0, np.float32), 0.0
        for start in range(0, u.shape[0], rows):
            block = np.abs((u[start : start + rows] @ v.T).numpy().reshape(-1))
            # nothing below the block's own keep-th magnitude can enter, nor a zero, nor a value
            # at or below `cutoff`, the kept set's smallest (a tie with it comes later)
            kth = block.size - keep
            floor = np.partition(block, kth)[kth] if 0 < keep < block.size else 0
            fresh = np.flatnonzero((block > cutoff) & (block >= floor))
            top = np.concatenate([top, fresh + start * n])
            top_abs = np.concatenate([top_abs, block[fresh]])
            if top.size > keep:  # all above the keep-th magnitude, then ties by position
                cutoff = np.partition(top_abs, top.size - keep)[top.size - keep]
                chosen = top_abs > cutoff
                tied = np.flatnonzero(top_abs == cutoff)
                chosen[tied[: keep - int(chosen.sum())]] = True
                top, top_abs = top[chosen], top_abs[chosen]
        union = torch.unique(torch.cat([torch.from_numpy(top), positions.cpu()]))
        summed = (u[union // n] * v[union % n]).sum(1)
        summed.index_add_(0, torch.searchsorted(union, positions.cpu()), values.cpu())
        return union, summed

    def prepared(
        self, name: str, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and values of one tensor on `device`, values cast to `dtype`; cached."""
        key = (name, dtype, device)
        values = self._prepared.get(key)
        if values is None:
            values = self.values[name].to(device=device, dtype=dtype).contiguous()
            self._prepared[key] = values
        index_key = (name, device)
        indices = self._prepared.get(index_key)
        if indices is None:
            indices = self.indices[name].to(device=device, dtype=torch.int64).contiguous()
            self._prepared[index_key] = indices
        return indices, values


def file_version(diff: SparseDiff) -> int:
    """The format version a diff is written as: 2 when it holds factors of rank >= 1, else 1."""
    has_factors = any(u.dim() == 2 and u.shape[1] > 0 for u, _ in diff.factors.values())
    return FACTORS_FORMAT_VERSION if has_factors else FORMAT_VERSION


def factor_key(name: str, which: str) -> str:
    """The safetensors key of a factor: `factor.<tensor>.u` or `factor.<tensor>.v`."""
    return f"{FACTOR_PREFIX}{name}.{which}"
