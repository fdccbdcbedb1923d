"""Statistics of a sparse diff: where its nonzeros sit in the base (per layer, per module)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from registry.artifact import SparseDiff

_LAYER_PARAM = re.compile(r"^(?:.*\.)?layer\.(\d+)\.(.+)$")


def layer_module_of(name: str) -> tuple[str, str]:
    """Split a base parameter name into (layer, module), e.g. ("layer 3", "attention.self.query")."""
    stem = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    match = _LAYER_PARAM.match(stem)
    if match:
        return f"layer {int(match.group(1))}", match.group(2)
    head, _, rest = stem.partition(".")
    return head, rest or head


def nonzeros_per_layer(diff: SparseDiff) -> dict[str, int]:
    """Nonzeros per layer ("embeddings", "layer 0", ..., "pooler")."""
    counts: dict[str, int] = {}
    for name, idx in diff.indices.items():
        layer = layer_module_of(name)[0]
        counts[layer] = counts.get(layer, 0) + int(idx.numel())
    return counts
