"""Prediction serving: one base model in memory, task diffs applied and reverted per request.

torch and transformers are imported lazily, on the first prediction, so importing the API
app stays light.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from registry.artifact import SparseDiff
    from registry.basemodel import LoadedBase

# A classification head is built once per base; each task's head tensors replace its parameters.
_PLACEHOLDER_LABELS = 2


class PredictionInputError(ValueError):
    """An input the predictor cannot use (wrong shape for the task type)."""


@dataclass
class _ServingBase:
    """A base model held for serving: a classification model whose head is swapped per task."""

    loaded: LoadedBase
    model: Any  # transformers PreTrainedModel
    base_shapes: dict[str, tuple[int, ...]]
    head_names: set[str]
    # A consolidation group's shared diff left applied between requests: (cache key, applied).
    resident: tuple[str, Any] | None = None


@dataclass
class _PreparedDiff:
    """A decoded diff ready to apply, with its head tensors in the model's dtype."""

    diff: SparseDiff
    head: dict[str, torch.Tensor]


class Predictor:
    """Serves many tasks from one base: apply diff -> forward -> revert, under one lock.

    Decoded diffs are kept in an LRU of `cache_size` entries keyed by the artifact's sha256
    (artifacts are content-addressed, so a key never goes stale).
    """

    def __init__(self, *, cache_size: int = 64, device: str = "cpu", batch_size: int = 32) -> None:
        self.cache_size = max(1, cache_size)
        self.device = device
        self.batch_size = batch_size
        self._bases: dict[str, _ServingBase] = {}
        self._diffs: OrderedDict[str, _PreparedDiff] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    # -- loading ----------------------------------------------------------------------

    def base(self, name_or_path: str) -> _ServingBase:
        """The serving model of a base (loaded on first use)."""
        with self._lock:
            return self._base_locked(name_or_path)

    def _base_locked(self, name_or_path: str) -> _ServingBase:
        from registry.basemodel import resolve_base_path

        path = resolve_base_path(name_or_path)
        held = self._bases.get(path)
        if held is None:
            held = self._load_base(path)
            self._bases[path] = held
        return held

    def _load_base(self, path: str) -> _ServingBase:
        from registry.basemodel import build_model, load_base

        loaded = load_base(path)
        model = build_model(loaded, task_type="classification", num_labels=_PLACEHOLDER_LABELS)
        model.to(self.device).eval()
        for param in model.parameters():
            param.requires_grad_(False)
        encoder = model.base_model
        base_shapes = {name: tuple(p.shape) for name, p in encoder.named_parameters()}
        encoder_ids = {id(p) for p in encoder.parameters()}
        head_names = {name for name, p in model.named_parameters() if id(p) not in encoder_ids}
        return _ServingBase(loaded, model, base_shapes, head_names)

    def _prepare(self, held: _ServingBase, data: bytes) -> _PreparedDiff:
        import torch

        from registry.artifact import ArtifactError, loads_artifact

        diff = loads_artifact(
            data, expected_fingerprint=held.loaded.fingerprint, base_shapes=held.base_shapes
        )
        unknown = sorted(set(diff.head) - held.head_names)
        if unknown:
            raise ArtifactError(f"head tensor {unknown[0]!r} does not exist in the base's model")
        dtype = next(held.model.parameters()).dtype
        head = {
            name: torch.nn.Parameter(t.to(device=self.device, dtype=dtype), requires_grad=False)
            for name, t in diff.head.items()
        }
        return _PreparedDiff(diff, head)

    def _cached(self, held: _ServingBase, key: str, fetch: Callable[[], bytes]) -> _PreparedDiff:
        cache_key = f"{held.loaded.fingerprint}:{key}"
        prepared = self._diffs.get(cache_key)
        if prepared is not None:
            self._diffs.move_to_end(cache_key)
            self.cache_hits += 1
            return prepared
        self.cache_misses += 1
        prepared = self._prepare(held, fetch())
        self._diffs[cache_key] = prepared
        while len(self._diffs) > self.cache_size:
            self._diffs.popitem(last=False)
        return prepared

    # -- predicting -------------------------------------------------------------------

    def predict(
        self,
        *,
        base: str,
        diff_key: str,
        fetch: Callable[[], bytes],
        inputs: Sequence[str] | Sequence[Sequence[str]],
    ) -> list[dict[str, Any]]:
        """Predict `inputs` with the diff stored under `diff_key` (bytes from `fetch` on a miss)."""
        with self._lock:
            held = self._base_locked(base)
            prepared = self._cached(held, diff_key, fetch)
            self._hold_shared(held, None, None)
            return self._predict_locked(held, prepared, inputs)

    def predict_factored(
        self,
        *,
        base: str,
        shared_key: str,
        fetch_shared: Callable[[], bytes],
        residual_key: str,
        fetch_residual: Callable[[], bytes],
        inputs: Sequence[str] | Sequence[Sequence[str]],
    ) -> list[dict[str, Any]]:
        """Predict with a consolidated version: its group's shared diff stays applied across
        requests of the group; only the task's residual (and head) is applied and reverted."""
        with self._lock:
            held = self._base_locked(base)
            shared = self._cached(held, shared_key, fetch_shared)
            residual = self._cached(held, residual_key, fetch_residual)
            self._hold_shared(held, shared_key, shared)
            return self._predict_locked(held, residual, inputs)

    def _hold_shared(
        self, held: _ServingBase, key: str | None, shared: _PreparedDiff | None
    ) -> None:
        """Leave exactly `shared` applied to the base (None: the pristine base); O(nnz) on change."""
        from registry.apply import apply_diff

        if held.resident is not None and held.resident[0] == key:
            return
        if held.resident is not None:
            held.resident[1].revert()
            held.resident = None
        if shared is not None and key is not None:
            held.resident = (key, apply_diff(held.model.base_model, shared.diff))

    def predict_artifact(
        self, data: bytes, inputs: Sequence[str] | Sequence[Sequence[str]], *, base: str
    ) -> list[dict[str, Any]]:
        """Predict with an artifact given as bytes (library mode; nothing is cached)."""
        with self._lock:
            held = self._base_locked(base)
            self._hold_shared(held, None, None)
            return self._predict_locked(held, self._prepare(held, data), inputs)

    def _predict_locked(
        self,
        held: _ServingBase,
        prepared: _PreparedDiff,
        inputs: Sequence[str] | Sequence[Sequence[str]],
    ) -> list[dict[str, Any]]:
        import torch

        from registry.apply import apply_diff

        meta = prepared.diff.meta
        texts, pairs = _split_inputs(inputs, meta.task_type)
        saved_head = self._swap_head(held.model, prepared.head)
        applied = apply_diff(held.model.base_model, prepared.diff)
        try:
            logits = []
            with torch.inference_mode():
                for start in range(0, len(texts), self.batch_size):
                    end = start + self.batch_size
                    encoded = held.loaded.encode(
                        texts[start:end],
                        pairs[start:end] if pairs is not None else None,
                        max_length=meta.max_length,
                    )
                    encoded = {k: v.to(self.device) for k, v in encoded.items()}
                    logits.append(held.model(**encoded).logits.float().cpu())
        finally:
            applied.revert()
            self._swap_head(held.model, saved_head)
        return _decode(torch.cat(logits), meta.task_type, meta.label_names)

    @staticmethod
    def _swap_head(model: Any, head: dict[str, Any]) -> dict[str, Any]:
        """Put `head` parameters into the model; return the ones they replaced."""
        previous = {}
        for name, param in head.items():
            module_path, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_path) if module_path else model
            previous[name] = module._parameters[leaf]
            module._parameters[leaf] = param
        return previous


def _split_inputs(
    inputs: Sequence[str] | Sequence[Sequence[str]], task_type: str
) -> tuple[list[str], list[str] | None]:
    """Texts and, for pair tasks, their second texts; a shape mismatch is an input error."""
    is_pair = [not isinstance(item, str) for item in inputs]
    if task_type == "pair-classification":
        if not all(is_pair):
            raise PredictionInputError(
                "this task takes pairs: every input must be [text, text_pair]"
            )
        for item in inputs:
            if len(item) != 2:
                raise PredictionInputError("every input must be a pair [text, text_pair]")
        return [str(item[0]) for item in inputs], [str(item[1]) for item in inputs]
    if any(is_pair):
        raise PredictionInputError("this task takes single texts, not pairs")
    return [str(item) for item in inputs], None


def _decode(logits: torch.Tensor, task_type: str, label_names: list[str]) -> list[dict[str, Any]]:
    """Logits -> `{"label", "score"}` (classification) or `{"value"}` (regression)."""
    if task_type == "regression":
        return [{"value": float(v)} for v in logits[:, 0].tolist()]
    probs = logits.softmax(dim=-1)
    scores, indices = probs.max(dim=-1)
    return [
        {"label": label_names[i] if i < len(label_names) else str(i), "score": float(s)}
        for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
    ]
