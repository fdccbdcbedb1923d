"""A consolidated version's diff, composed from its parts on request: shared + residual.

`compose_diffs` is the one definition every path uses (the diff download, `/parts`, stats,
export of a downloaded diff, the consolidation runner's current diff, its evaluation): entries
are the union of both parts' positions with values summed; factors are concatenated along the
rank axis, [U_s U_r][V_s V_r]ᵀ = U_s V_sᵀ + U_r V_rᵀ; head and meta come from the residual,
which carries the task.

Layouts of a consolidated version (no migration: the rule is on the row):
- composed on request (`artifact_id == residual_artifact_id`, `shared_artifact_id` set): the
  version stores only its residual and references the run's shared artifact, stored once;
- stored composed (older runs): `artifact` is a composed blob beside separate residual and
  shared artifacts, and is read as it is.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from registry.artifact import (
    VALUE_DTYPES,
    ArtifactError,
    SparseDiff,
    dumps_artifact,
    loads_artifact,
    make_meta_consistent,
)

if TYPE_CHECKING:
    from registry.models import TaskVersion
    from registry.stores.base import ObjectStore


def compose_diffs(shared: SparseDiff, residual: SparseDiff) -> SparseDiff:
    """One diff equal to `shared` then `residual`: entries summed on their union, factors concatenated."""
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


def composed_on_request(version: TaskVersion) -> bool:
    """Whether a version stores only its residual (plus the run's shared artifact)."""
    return (
        version.shared_artifact_id is not None
        and version.residual_artifact_id is not None
        and version.artifact_id == version.residual_artifact_id
    )


def version_diff(
    store: ObjectStore,
    version: TaskVersion,
    *,
    expected_fingerprint: str | None = None,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> SparseDiff:
    """The diff a version stands for: its stored blob, or its shared + residual composed."""

    def read(artifact: Any) -> SparseDiff:
        """Fetch (sha256-verified) and validate one stored artifact."""
        return loads_artifact(
            store.get(artifact.object_key, sha256=artifact.sha256),
            expected_fingerprint=expected_fingerprint,
            base_shapes=base_shapes,
        )

    if not composed_on_request(version):
        return read(version.artifact)
    return compose_diffs(read(version.shared_artifact), read(version.artifact))


def version_diff_bytes(store: ObjectStore, version: TaskVersion) -> bytes:
    """The artifact bytes a version's download returns: stored, or composed (deterministic bytes)."""
    if not composed_on_request(version):
        return store.get(version.artifact.object_key, sha256=version.artifact.sha256)
    return dumps_artifact(version_diff(store, version))
