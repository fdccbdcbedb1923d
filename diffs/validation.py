"""The one check every read path makes before it uses an artifact (inspect, predict, serving,
export): its meta agrees with its own head, its factors are well formed, and the head, meta,
tensors and factors fit the base it runs on.

The file's checksum is unkeyed, so a consistent-looking file proves nothing about its author:
an edited meta (other labels, another task type, a longer max_length) must be refused here,
not produce wrong labels or a crash on the first long input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffs.checks import check_base_shapes, check_diff_factors
from diffs.types import ArtifactError, SparseDiff

if TYPE_CHECKING:
    from diffs.basemodel import LoadedBase

# Where transformers' sequence classifiers put their last layer (BERT-like, RoBERTa-like, GPT-like).
OUTPUT_LAYERS = ("classifier.out_proj", "classifier", "score")


def output_rows(head: dict) -> int | None:
    """The number of outputs of a head's last layer, or None when it has no known last layer."""
    for layer in OUTPUT_LAYERS:
        weight = head.get(f"{layer}.weight")
        if weight is not None and weight.ndim == 2:
            return int(weight.shape[0])
    return None


def check_artifact(diff: SparseDiff, base: LoadedBase | None = None) -> None:
    """Raise ArtifactError unless the meta fits the head (and, given a base, the base)."""
    meta = diff.meta
    check_diff_factors(diff)
    rows = output_rows(diff.head)
    if rows is not None and rows != meta.num_labels:
        if meta.task_type == "regression":
            raise ArtifactError(
                f"meta.task_type is regression (one output), but the head has {rows} outputs"
            )
        raise ArtifactError(
            f"meta.label_names names {len(meta.label_names)} labels, but the head has "
            f"{rows} outputs"
        )
    if base is None:
        return
    if meta.base_fingerprint != base.fingerprint:
        raise ArtifactError(
            f"wrong base: the diff was made for {meta.base_name!r} "
            f"({meta.base_fingerprint[:12]}…), not {base.name!r} ({base.fingerprint[:12]}…)"
        )
    check_base_shapes([(name, diff.shapes[name]) for name in diff.tensor_names], base.shapes)
    expected = base.head_shapes(meta.task_type, meta.num_labels) if diff.head else {}
    if set(diff.head) != set(expected):  # a consolidation's shared part has no head at all
        raise ArtifactError(
            f"head tensors {sorted(diff.head)} do not match the model's head {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(diff.head[name].shape) != shape:
            raise ArtifactError(
                f"head tensor {name!r} has shape {tuple(diff.head[name].shape)}, the "
                f"{meta.task_type} model with {meta.num_labels} output(s) expects {shape}"
            )
    if base.max_positions is not None and meta.max_length > base.max_positions:
        raise ArtifactError(
            f"meta.max_length {meta.max_length} is longer than the base's "
            f"{base.max_positions} positions"
        )
