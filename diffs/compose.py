"""A consolidated version's diff, composed from its parts: shared + residual.

`compose_diffs` is the one definition every path uses (the diff download, `/parts`, stats,
export of a downloaded diff, the consolidation runner's current diff, its evaluation): entries
are the union of both parts' positions with values summed; factors are concatenated along the
rank axis, [U_s U_r][V_s V_r]ᵀ = U_s V_sᵀ + U_r V_rᵀ; head and meta come from the residual,
which carries the task. `compose_artifact_bytes` is the one serialisation of it. Which versions
are composed on request, and from which stored parts: `registry.layouts`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

# torch and the artifact format are imported where used: the catalog imports this module
# (registry.layouts) on light paths (the API's version listings, the scheduler) without torch.
if TYPE_CHECKING:
    from diffs.types import SparseDiff


def compose_diffs(shared: SparseDiff, residual: SparseDiff) -> SparseDiff:
    """One diff equal to `shared` then `residual`: entries summed on their union, factors concatenated."""
    import torch

    from diffs.build import make_meta_consistent
    from diffs.types import VALUE_DTYPES, ArtifactError, SparseDiff

    if (shared.meta.base_fingerprint, shared.meta.n_params) != (
        residual.meta.base_fingerprint,
        residual.meta.n_params,
    ):
        raise ArtifactError("the shared and residual diffs are for different bases")
    for name in set(shared.shapes) & set(residual.shapes):
        if tuple(shared.shapes[name]) != tuple(residual.shapes[name]):
            raise ArtifactError(
                f"shape of {name!r} is {tuple(shared.shapes[name])} in the shared diff but "
                f"{tuple(residual.shapes[name])} in the residual"
            )
    dtype = VALUE_DTYPES[residual.meta.value_dtype]
    indices: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for name in sorted(set(shared.indices) | set(residual.indices)):
        parts = [d for d in (shared, residual) if name in d.indices]
        if len(parts) == 1:
            indices[name] = parts[0].indices[name].clone()
            values[name] = parts[0].values[name].to(dtype).clone()
            continue
        positions = torch.cat([d.indices[name] for d in parts])
        union, where = torch.unique(positions, sorted=True, return_inverse=True)
        summed = torch.zeros(union.numel(), dtype=torch.float32)
        summed.index_add_(0, where, torch.cat([d.values[name].float() for d in parts]))
        indices[name], values[name] = union, summed.to(dtype)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted(set(shared.factors) | set(residual.factors)):
        pairs = [d.factors[name] for d in (shared, residual) if name in d.factors]
        factors[name] = (
            torch.cat([u.to(dtype) for u, _ in pairs], dim=1),
            torch.cat([v.to(dtype) for _, v in pairs], dim=1),
        )
    names = set(indices) | set(factors)
    shapes = {n: tuple(s) for n, s in {**shared.shapes, **residual.shapes}.items() if n in names}
    meta = dataclasses.replace(residual.meta, extra=_composed_extra(residual.meta.extra))
    head = {name: t.clone() for name, t in residual.head.items()}
    return make_meta_consistent(SparseDiff(indices, values, shapes, head, meta, factors))


def _composed_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """The residual's meta.extra with its consolidation role set to 'composed'."""
    lineage = extra.get("consolidation")
    if not isinstance(lineage, dict):
        return dict(extra)
    return {**extra, "consolidation": {**lineage, "role": "composed"}}


def compose_artifact_bytes(shared: bytes, residual: bytes) -> bytes:
    """The composed artifact of two stored parts' bytes (deterministic: publish, download agree)."""
    from diffs.read import loads_artifact
    from diffs.write import dumps_artifact

    return dumps_artifact(compose_diffs(loads_artifact(shared), loads_artifact(residual)))
