"""Statistics of a sparse diff: where its stored values (entries, factors) sit in the base."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffs.types import SparseDiff

_LAYER_PARAM = re.compile(r"^(?:.*\.)?layer\.(\d+)\.(.+)$")


def layer_module_of(name: str) -> tuple[str, str]:
    """Split a base parameter name into (layer, module), e.g. ("layer 3", "attention.self.query")."""
    stem = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    match = _LAYER_PARAM.match(stem)
    if match:
        return f"layer {int(match.group(1))}", match.group(2)
    head, _, rest = stem.partition(".")
    return head, rest or head


def stored_values_of(diff: SparseDiff) -> dict[str, int]:
    """Stored values per base tensor: its sparse entries plus its factor values r·(m + n)."""
    counts = {name: int(idx.numel()) for name, idx in diff.indices.items()}
    for name, (u, v) in diff.factors.items():
        counts[name] = counts.get(name, 0) + int(u.numel()) + int(v.numel())
    return counts


def factor_ranks(diff: SparseDiff) -> dict[str, int]:
    """The rank of each factored tensor's low-rank part."""
    return {name: int(u.shape[1]) for name, (u, _) in sorted(diff.factors.items())}


def nonzeros_per_layer(diff: SparseDiff) -> dict[str, int]:
    """Stored values per layer ("embeddings", "layer 0", ..., "pooler"): entries + factor values."""
    counts: dict[str, int] = {}
    for name, stored in stored_values_of(diff).items():
        layer = layer_module_of(name)[0]
        counts[layer] = counts.get(layer, 0) + stored
    return counts
