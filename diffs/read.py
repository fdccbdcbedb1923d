"""The sparse-diff artifact format: one safetensors file per task version (read, write, validate).

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
import hashlib
import json
import math
import re
import struct
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from registry import index_coding
from registry.basemodel import TASK_TYPES

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
    # Caches for registry.apply.apply_diff: (name, dtype, device) -> values, (name, device)
    # -> indices, and per encoder the validated list of targets. A diff is not to be mutated
    # once applied.
    _prepared: dict[tuple, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _plans: weakref.WeakKeyDictionary = field(
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


# ---------------------------------------------------------------- building


def file_version(diff: SparseDiff) -> int:
    """The format version a diff is written as: 2 when it holds factors of rank >= 1, else 1."""
    has_factors = any(u.dim() == 2 and u.shape[1] > 0 for u, _ in diff.factors.values())
    return FACTORS_FORMAT_VERSION if has_factors else FORMAT_VERSION


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


# ---------------------------------------------------------------- writing


def _check_diff(diff: SparseDiff) -> None:
    """Refuse to write a diff that a reader would reject."""
    meta = diff.meta
    _check_meta(meta)
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
    _check_counts(meta, sum(math.prod(diff.shapes[name]) for name in diff.tensor_names))
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


def factor_key(name: str, which: str) -> str:
    """The safetensors key of a factor: `factor.<tensor>.u` or `factor.<tensor>.v`."""
    return f"{FACTOR_PREFIX}{name}.{which}"


DIGEST_PLACEHOLDER = "0" * 64


def _digest_slot(data: bytes | bytearray, header_end: int, digest: str) -> int:
    """Offset of the digest's value inside the raw header, or -1 when it is not there once."""
    needle = b'"sha256":"' + digest.encode("ascii") + b'"'
    first = data.find(needle, 8, header_end)
    if first < 0 or data.find(needle, first + 1, header_end) >= 0:
        return -1
    return first + len(b'"sha256":"')


def _file_digest(data: bytes | bytearray, slot: int) -> str:
    """sha256 of the file with the 64 digest characters at `slot` read as zeros."""
    digest = hashlib.sha256(memoryview(data)[:slot])
    digest.update(DIGEST_PLACEHOLDER.encode("ascii"))
    digest.update(memoryview(data)[slot + 64 :])
    return digest.hexdigest()


def _canonical_header(blob: bytes) -> bytearray:
    """The same safetensors file under a canonical header: metadata keys sorted, tensors by offset."""
    # safetensors writes its metadata map in a random order: the same diff must give the same
    # bytes (content keys, ETags, ranged downloads of a diff composed on request).
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return bytearray(struct.pack("<Q", len(raw)) + raw + blob[8 + header_len :])


def pack_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors and metadata to safetensors bytes with a whole-file `sha256` digest."""
    from safetensors.torch import save

    blob = _canonical_header(save(tensors, metadata=dict(metadata, sha256=DIGEST_PLACEHOLDER)))
    (header_len,) = struct.unpack("<Q", blob[:8])
    slot = _digest_slot(blob, 8 + header_len, DIGEST_PLACEHOLDER)
    if slot < 0:
        raise ArtifactError("metadata must not contain the digest placeholder")
    blob[slot : slot + 64] = _file_digest(blob, slot).encode("ascii")
    return bytes(blob)


def dumps_artifact(diff: SparseDiff) -> bytes:
    """Serialise a SparseDiff to the safetensors artifact format."""
    _check_diff(diff)
    names = sorted(name for name, idx in diff.indices.items() if idx.numel())
    layout = [[name, list(diff.shapes[name]), int(diff.indices[name].numel())] for name in names]
    offsets = np.cumsum([0] + [math.prod(diff.shapes[name]) for name in names])
    universe = int(offsets[-1])
    if names:
        global_indices = np.concatenate(
            [diff.indices[name].cpu().numpy() + offsets[i] for i, name in enumerate(names)]
        )
        values = torch.cat([diff.values[name].cpu() for name in names])
    else:
        global_indices = np.zeros(0, dtype=np.int64)
        values = torch.zeros(0, dtype=VALUE_DTYPES[diff.meta.value_dtype])
    coded = index_coding.encode(global_indices, universe)
    tensors = {
        INDEX_LOW_KEY: torch.from_numpy(coded.low),
        INDEX_HIGH_KEY: torch.from_numpy(coded.high),
        VALUES_KEY: values.contiguous(),
    }
    for name, tensor in diff.head.items():
        tensors[HEAD_PREFIX + name] = tensor.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(diff.meta.format_version),
        "index_coding": INDEX_CODING,
        "layout": json.dumps(layout, separators=(",", ":")),
        "meta": diff.meta.to_json(),
    }
    factored = sorted(name for name, (u, _) in diff.factors.items() if u.shape[1])
    if factored:
        factors = [
            [name, list(diff.shapes[name]), int(diff.factors[name][0].shape[1])]
            for name in factored
        ]
        metadata["factors"] = json.dumps(factors, separators=(",", ":"))
        for name in factored:
            u, v = diff.factors[name]
            tensors[factor_key(name, "u")] = u.detach().to("cpu").contiguous()
            tensors[factor_key(name, "v")] = v.detach().to("cpu").contiguous()
    return pack_file(tensors, metadata)


def save_artifact(diff: SparseDiff, path: str | Path) -> int:
    """Write the artifact to `path` (atomically, via a temporary file); returns its size."""
    data = dumps_artifact(diff)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


# ---------------------------------------------------------------- reading


def _parse_header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the offset where tensor data starts."""
    if len(data) < 8:
        raise ArtifactError(
            f"truncated file: {len(data)} bytes, too short for a safetensors header"
        )
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise ArtifactError(
            f"truncated file or bad header length: header claims {header_len} bytes, "
            f"file has {len(data)}"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"bad header JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ArtifactError("bad header JSON: not an object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ArtifactError(f"bad header JSON: tensor {name!r} has no valid data_offsets")
        data_end = max(data_end, offsets[1])
    available = len(data) - (8 + header_len)
    if available < data_end:
        raise ArtifactError(
            f"truncated file: tensor data needs {data_end} bytes after the header, "
            f"only {available} present"
        )
    return header, 8 + header_len


def _json_field(metadata: dict[str, str], key: str) -> Any:
    """Parse one JSON-valued metadata entry."""
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise ArtifactError(f"metadata is missing {key!r}") from None
    except (TypeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"bad JSON in metadata {key!r}: {exc}") from None


_META_TYPES: dict[str, tuple[type, ...]] = {
    "base_name": (str,),
    "base_fingerprint": (str,),
    "n_params": (int,),
    "task_type": (str,),
    "label_names": (list,),
    "max_length": (int,),
    "text_field": (str,),
    "text_pair_field": (str, type(None)),
    "value_dtype": (str,),
    "density": (float, int),
    "nnz": (int,),
    "config": (dict,),
    "metrics": (dict,),
    "extra": (dict,),
    "format_version": (int,),
}


def _meta_from_json(raw: Any) -> ArtifactMeta:
    """Validate the decoded `meta` object and build an ArtifactMeta."""
    if not isinstance(raw, dict):
        raise ArtifactError("metadata 'meta' must be a JSON object")
    unknown = sorted(set(raw) - set(_META_TYPES))
    missing = sorted(set(_META_TYPES) - set(raw))
    if unknown or missing:
        raise ArtifactError(f"metadata 'meta' has unknown keys {unknown} / missing keys {missing}")
    for key, types in _META_TYPES.items():
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ArtifactError(f"metadata field {key!r} has the wrong type: {value!r}")
    meta = ArtifactMeta(**raw)
    meta.density = float(meta.density)
    _check_meta(meta)
    return meta


def _check_meta(meta: ArtifactMeta) -> None:
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


def _check_counts(meta: ArtifactMeta, diff_entries: int) -> None:
    """The diff's tensors fit in n_params and meta.density is nnz / n_params."""
    if diff_entries > meta.n_params:
        raise ArtifactError(
            f"diff tensors hold {diff_entries} entries, more than meta.n_params {meta.n_params}"
        )
    expected = meta.nnz / meta.n_params if meta.n_params else 0.0
    if not math.isclose(meta.density, expected, rel_tol=1e-9, abs_tol=1e-15):
        raise ArtifactError(f"meta.density {meta.density} does not equal nnz / n_params")


def _named_entries(
    raw: Any, field: str, *, min_dim: int, ndim: int | None, min_count: int, usage: str
) -> list[tuple[str, tuple[int, ...], int]]:
    """Validate a decoded list of [name, shape, count] triples with sorted unique names."""
    if not isinstance(raw, list):
        raise ArtifactError(f"metadata {field!r} must be a JSON list")
    entries: list[tuple[str, tuple[int, ...], int]] = []
    for entry in raw:
        ok = (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and (ndim is None or len(entry[1]) == ndim)
            and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= min_dim for d in entry[1]
            )
            and isinstance(entry[2], int)
            and not isinstance(entry[2], bool)
            and entry[2] >= min_count
        )
        if not ok:
            raise ArtifactError(f"bad {field} entry {entry!r}: expected {usage}")
        name = entry[0]
        if entries and name <= entries[-1][0]:
            raise ArtifactError(f"{field} tensor names must be sorted and unique at {name!r}")
        entries.append((name, tuple(entry[1]), entry[2]))
    return entries


def _layout_from_json(raw: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """Validate the decoded `layout`: sorted unique names, shapes, 1 <= nnz <= numel."""
    layout = _named_entries(
        raw, "layout", min_dim=0, ndim=None, min_count=0, usage="[name, shape, nnz]"
    )
    for name, shape, nnz in layout:
        if not 1 <= nnz <= math.prod(shape):
            raise ArtifactError(f"layout gives {name!r} {nnz} nonzeros for shape {shape}")
    return layout


def _factors_from_json(raw: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """Validate the decoded `factors`: sorted unique names, 2-D shapes, rank >= 1."""
    if raw == []:
        raise ArtifactError("metadata 'factors' must be a non-empty JSON list")
    return _named_entries(
        raw, "factors", min_dim=1, ndim=2, min_count=1, usage="[name, [m, n], rank >= 1]"
    )


def _load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with safetensors' own errors turned into ArtifactError."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # SafetensorError and friends: the file is not valid safetensors
        raise ArtifactError(f"corrupt safetensors data: {exc}") from None


def loads_artifact(
    data: bytes,
    *,
    expected_fingerprint: str | None = None,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> SparseDiff:
    """Parse and fully validate artifact bytes; checks the base when its identity is given."""
    data = bytes(data)
    header, data_start = _parse_header(data)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactError("not a diffbank artifact: header has no string __metadata__")
    if metadata.get("format") != FORMAT_NAME:
        raise ArtifactError(f"not a diffbank artifact: format is {metadata.get('format')!r}")
    version = metadata.get("format_version")
    if version not in [str(v) for v in FORMAT_VERSIONS]:
        raise ArtifactError(
            f"unsupported format version {version!r} "
            f"(this diffbank reads versions {', '.join(map(str, FORMAT_VERSIONS))})"
        )
    if metadata.get("index_coding") != INDEX_CODING:
        raise ArtifactError(f"unsupported index coding {metadata.get('index_coding')!r}")
    digest = metadata.get("sha256", "")
    slot = _digest_slot(data, data_start, digest) if re.fullmatch("[0-9a-f]{64}", digest) else -1
    if slot < 0 or _file_digest(data, slot) != digest:
        raise ArtifactError("checksum mismatch: the file was modified or corrupted (sha256)")

    meta = _meta_from_json(_json_field(metadata, "meta"))
    layout = _layout_from_json(_json_field(metadata, "layout"))
    if str(meta.format_version) != version:
        raise ArtifactError(
            f"meta.format_version {meta.format_version} disagrees with the file's format "
            f"version {version}"
        )
    if version == str(FORMAT_VERSION):
        if "factors" in metadata:
            raise ArtifactError("a version 1 artifact has no 'factors' metadata")
        factor_layout = []
    else:
        factor_layout = _factors_from_json(_json_field(metadata, "factors"))
    if expected_fingerprint is not None and meta.base_fingerprint != expected_fingerprint:
        raise ArtifactError(
            f"wrong base: the diff was made for base {meta.base_name!r} with fingerprint "
            f"{meta.base_fingerprint[:12]}…, the base in use has fingerprint "
            f"{expected_fingerprint[:12]}…"
        )
    if base_shapes is not None:
        check_base_shapes(
            [(name, shape) for name, shape, _ in [*layout, *factor_layout]], base_shapes
        )
        base_n = sum(math.prod(s) for s in base_shapes.values())
        if meta.n_params != base_n:
            raise ArtifactError(f"meta.n_params is {meta.n_params}, the base has {base_n}")
    else:
        check_factored_sizes((name, shape) for name, shape, _ in factor_layout)

    tensors = _load_tensors(data)
    expected = {INDEX_LOW_KEY, INDEX_HIGH_KEY, VALUES_KEY}
    expected |= {factor_key(name, which) for name, _, _ in factor_layout for which in "uv"}
    missing = sorted(expected - set(tensors))
    unknown = sorted(k for k in tensors if k not in expected and not k.startswith(HEAD_PREFIX))
    if missing or unknown:
        raise ArtifactError(f"artifact tensors: missing {missing}, unexpected {unknown}")
    low, high, values = tensors[INDEX_LOW_KEY], tensors[INDEX_HIGH_KEY], tensors[VALUES_KEY]
    if low.dtype != torch.uint8 or high.dtype != torch.uint8 or low.dim() != 1 or high.dim() != 1:
        raise ArtifactError("index streams must be 1-D uint8 tensors")
    if values.dtype != VALUE_DTYPES[meta.value_dtype]:
        raise ArtifactError(
            f"values have dtype {str(values.dtype).removeprefix('torch.')}, "
            f"meta.value_dtype says {meta.value_dtype}"
        )
    nnz = sum(entry[2] for entry in layout)
    if values.dim() != 1 or values.numel() != nnz:
        raise ArtifactError(f"values tensor has shape {tuple(values.shape)}, expected ({nnz},)")
    factor_values = sum(rank * (m + n) for _, (m, n), rank in factor_layout)
    if meta.nnz != nnz + factor_values:
        raise ArtifactError(
            f"meta.nnz is {meta.nnz} but the layout holds {nnz} nonzeros"
            + (f" and the factors {factor_values} values" if factor_layout else "")
        )
    sizes = [math.prod(shape) for _, shape, _ in layout]
    universe = sum(sizes)
    in_layout = {name: shape for name, shape, _ in layout}
    for name, shape, _ in factor_layout:
        if name in in_layout and in_layout[name] != shape:
            raise ArtifactError(
                f"{name!r} has shape {in_layout[name]} in the layout but {shape} in the factors"
            )
    _check_counts(
        meta,
        universe + sum(m * n for name, (m, n), _ in factor_layout if name not in in_layout),
    )
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, shape, rank in factor_layout:
        pair = (tensors[factor_key(name, "u")], tensors[factor_key(name, "v")])
        check_factors(name, pair, shape, VALUE_DTYPES[meta.value_dtype])
        if pair[0].shape[1] != rank:
            raise ArtifactError(
                f"factors of {name!r} have rank {pair[0].shape[1]}, metadata 'factors' says {rank}"
            )
        factors[name] = pair
    try:
        global_indices = index_coding.decode(low.numpy(), high.numpy(), nnz, universe)
    except index_coding.IndexCodingError as exc:
        raise ArtifactError(f"bad index stream: {exc}") from None
    if not all_finite(values):
        raise ArtifactError("values contain NaN or infinity")

    offsets = np.cumsum([0] + sizes)
    bounds = np.searchsorted(global_indices, offsets)
    indices: dict[str, torch.Tensor] = {}
    per_tensor_values: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (name, shape, count) in enumerate(layout):
        start, stop = int(bounds[i]), int(bounds[i + 1])
        if stop - start != count:
            raise ArtifactError(
                f"{name!r}: layout says {count} nonzeros, the index stream holds {stop - start}"
            )
        indices[name] = torch.from_numpy(global_indices[start:stop] - offsets[i])
        per_tensor_values[name] = values[start:stop]
        shapes[name] = shape
    head = {}
    for key, tensor in tensors.items():
        if key.startswith(HEAD_PREFIX):
            if not tensor.is_floating_point() or not all_finite(tensor):
                raise ArtifactError(f"head tensor {key[len(HEAD_PREFIX) :]!r} is not finite float")
            head[key[len(HEAD_PREFIX) :]] = tensor
    for name, shape, _ in factor_layout:
        shapes[name] = shape
    return SparseDiff(indices, per_tensor_values, shapes, head, meta, factors)


def load_artifact(
    path: str | Path,
    *,
    expected_fingerprint: str | None = None,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> SparseDiff:
    """Read and validate an artifact file (see `loads_artifact`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {str(path)!r}: {exc.strerror}") from None
    return loads_artifact(data, expected_fingerprint=expected_fingerprint, base_shapes=base_shapes)
