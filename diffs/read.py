"""Reading artifact bytes or an artifact file into a `SparseDiff`, fully validated; checks the
base when its identity is given."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffs import index_coding
from diffs.checks import (
    all_finite,
    check_base_shapes,
    check_counts,
    check_factored_sizes,
    check_factors,
    check_meta,
)
from diffs.container import digest_slot, file_digest, load_tensors, parse_header
from diffs.types import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    HEAD_PREFIX,
    INDEX_CODING,
    INDEX_HIGH_KEY,
    INDEX_LOW_KEY,
    VALUE_DTYPES,
    VALUES_KEY,
    ArtifactError,
    ArtifactMeta,
    SparseDiff,
    factor_key,
)


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
    check_meta(meta)
    return meta


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


def loads_artifact(
    data: bytes,
    *,
    expected_fingerprint: str | None = None,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> SparseDiff:
    """Parse and fully validate artifact bytes; checks the base when its identity is given."""
    data = bytes(data)
    header, data_start = parse_header(data)
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
    slot = digest_slot(data, data_start, digest) if re.fullmatch("[0-9a-f]{64}", digest) else -1
    if slot < 0 or file_digest(data, slot) != digest:
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

    tensors = load_tensors(data)
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
    check_counts(
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
