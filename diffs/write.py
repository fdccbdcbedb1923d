"""Writing a `SparseDiff` as artifact bytes or an artifact file (checked before it is written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from diffs import index_coding
from diffs.checks import check_diff
from diffs.container import pack_file
from diffs.types import (
    FORMAT_NAME,
    HEAD_PREFIX,
    INDEX_CODING,
    INDEX_HIGH_KEY,
    INDEX_LOW_KEY,
    VALUE_DTYPES,
    VALUES_KEY,
    SparseDiff,
    factor_key,
)


def dumps_artifact(diff: SparseDiff) -> bytes:
    """Serialise a SparseDiff to the safetensors artifact format."""
    check_diff(diff)
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
