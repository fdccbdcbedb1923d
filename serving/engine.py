"""Prediction serving: one pristine base per process, decoded task diffs resident, mixed batches.

Requests for any mix of tasks run as one mixed-task forward (api/mixed.py, heads in
api/heads.py); the decoded diffs
live in a cache bounded by bytes, filled once per artifact however many requests wait on it.
Library mode (`predict_artifact`, one artifact given as bytes) and diffs the mixed forward
cannot correct per row keep the apply -> forward -> revert path.

torch and transformers are imported lazily, on the first prediction, so importing the API
app stays light.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from diffs.basemodel import LoadedBase
    from diffs.types import ArtifactMeta, SparseDiff
    from serving.heads import HeadRunner, TaskHead
    from serving.mixed import DecodedDiff, MixedEncoder

# A classification head is built once per base; each task's head tensors replace its parameters.
_PLACEHOLDER_LABELS = 2
_PROBE_TEXTS = ["a probe", "another probe text", "three"]


class PredictionInputError(ValueError):
    """An input the predictor cannot use (wrong shape for the task type)."""


@dataclass(eq=False)
class _ServingBase:
    """A base model held for serving: pristine weights, mixed-forward hooks, head templates."""

    loaded: LoadedBase
    model: Any  # transformers PreTrainedModel with a placeholder head (library mode)
    base_shapes: dict[str, tuple[int, ...]]
    mixed: MixedEncoder
    heads: HeadRunner


@dataclass(eq=False)
class ResidentDiff:
    """One artifact as served: its decoded diff (None: apply/revert only), head and metadata."""

    meta: ArtifactMeta
    decoded: DecodedDiff | None
    head: TaskHead | None
    diff: SparseDiff | None  # kept only when `decoded` is None
    nbytes: int


@dataclass(eq=False)
class PreparedRequest:
    """A request ready for a batch: its diffs (shared first), head, and tokenised inputs."""

    base: _ServingBase
    diffs: list[ResidentDiff]
    encoded: dict[str, torch.Tensor]
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = int(self.encoded["input_ids"].shape[0])

    @property
    def task(self) -> ResidentDiff:
        """The diff carrying the task's head and metadata (the residual of a consolidated one)."""
        return self.diffs[-1]


class Predictor:
    """Serves many tasks from one pristine base through mixed-task forwards.

    Decoded diffs are kept in an LRU bounded by `cache_bytes` (and `cache_size` entries),
    keyed by the artifact's sha256 (content-addressed, so a key never goes stale).
    """

    def __init__(
        self,
        *,
        cache_size: int = 100_000,
        cache_bytes: int = 2 * 1024**3,
        device: str = "cpu",
        batch_size: int = 32,
        kernel: str = "auto",
        threads: int = 0,
    ) -> None:
        self.cache_size = max(1, cache_size)
        self.cache_bytes = max(1, cache_bytes)
        self.device = device
        self.batch_size = batch_size
        self.kernel = kernel
        self.threads = threads  # the process's torch threads, set when a base loads (0: keep)
        self.stage_times = {"forward": [0.0, 0.0]}  # cumulative (CPU s, wall s) of forwards
        self._bases: dict[str, _ServingBase] = {}
        self._bases_lock = threading.Lock()
        self._diffs: OrderedDict[str, ResidentDiff] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._cache_lock = threading.Lock()
        # Whoever runs a forward holds the base: the batcher's runner thread, or library mode.
        self.run_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_evictions = 0
        self.resident_bytes = 0

    # -- loading ----------------------------------------------------------------------

    def base(self, name_or_path: str) -> _ServingBase:
        """The serving model of a base (loaded on first use)."""
        from diffs.basemodel import resolve_base_path

        path = resolve_base_path(name_or_path)
        with self._bases_lock:
            held = self._bases.get(path)
            if held is None:
                held = self._load_base(path)
                self._bases[path] = held
            return held

    def _load_base(self, path: str) -> _ServingBase:
        from diffs.basemodel import build_model, load_base
        from serving.heads import HeadRunner
        from serving.mixed import MixedEncoder

        if self.threads > 0:
            import torch

            torch.set_num_threads(self.threads)
        loaded = load_base(path)
        model = build_model(loaded, task_type="classification", num_labels=_PLACEHOLDER_LABELS)
        model.to(self.device).eval()
        model.requires_grad_(False)
        encoder = model.base_model
        base_shapes = {name: tuple(p.shape) for name, p in encoder.named_parameters()}
        probe = {
            k: v.to(self.device)
            for k, v in loaded.encode(_PROBE_TEXTS, None, max_length=16).items()
        }
        mixed = MixedEncoder(encoder, probe_inputs=probe, kernel=self.kernel)

        def head_model(task_type: str, num_labels: int) -> Any:
            built = build_model(loaded, task_type=task_type, num_labels=num_labels)
            return built.to(self.device)

        heads = HeadRunner(head_model, model.base_model_prefix)
        return _ServingBase(loaded, model, base_shapes, mixed, heads)

    def _read(self, held: _ServingBase, data: bytes) -> tuple[SparseDiff, dict[str, Any]]:
        """The artifact checked against the base (its head fits the task's model, names and
        shapes), and its head as frozen parameters in the base's dtype on the device."""
        import torch

        from diffs.read import loads_artifact
        from diffs.validation import check_artifact

        diff = loads_artifact(
            data, expected_fingerprint=held.loaded.fingerprint, base_shapes=held.base_shapes
        )
        check_artifact(diff, held.loaded)
        head = {
            name: torch.nn.Parameter(
                t.to(device=self.device, dtype=held.mixed.dtype), requires_grad=False
            )
            for name, t in diff.head.items()
        }
        return diff, head

    def _decode(self, held: _ServingBase, data: bytes) -> ResidentDiff:
        from serving.heads import TaskHead
        from serving.mixed import UnsupportedDiffError

        diff, tensors = self._read(held, data)
        meta = diff.meta
        head = None
        if tensors:
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            head = TaskHead(tensors, meta.task_type, meta.num_labels, size)
        try:
            decoded = held.mixed.decode(diff)
        except UnsupportedDiffError:
            param = next(held.model.base_model.parameters())
            kept = applied_nbytes(diff, param.dtype, param.device) + (head.nbytes if head else 0)
            return ResidentDiff(meta, None, head, diff, kept)
        nbytes = decoded.nbytes + (head.nbytes if head else 0)
        return ResidentDiff(meta, decoded, head, None, nbytes)

    def resolve(self, base: str, key: str, fetch: Callable[[], bytes]) -> ResidentDiff:
        """The resident form of the artifact under `key`: fetched, verified and decoded once."""
        held = self.base(base)
        cache_key = f"{held.loaded.fingerprint}:{key}"
        with self._cache_lock:
            resident = self._diffs.get(cache_key)
            if resident is not None:
                self._diffs.move_to_end(cache_key)
                self.cache_hits += 1
                return resident
            pending = self._pending.get(cache_key)
            owner = pending is None
            if owner:
                pending = Future()
                self._pending[cache_key] = pending
                self.cache_misses += 1
        if not owner:
            return pending.result()
        try:
            resident = self._decode(held, fetch())
        except BaseException as exc:
            with self._cache_lock:
                del self._pending[cache_key]
            pending.set_exception(exc)
            raise
        with self._cache_lock:
            self._diffs[cache_key] = resident
            self.resident_bytes += resident.nbytes
            while len(self._diffs) > 1 and (
                len(self._diffs) > self.cache_size or self.resident_bytes > self.cache_bytes
            ):
                _, evicted = self._diffs.popitem(last=False)
                self.resident_bytes -= evicted.nbytes
                self.cache_evictions += 1
            del self._pending[cache_key]
        pending.set_result(resident)
        return resident

    def cache_stats(self) -> dict[str, int]:
        """Hits, misses, evictions, resident entries and resident bytes of the diff cache."""
        with self._cache_lock:
            return {
                "hits": self.cache_hits,
                "misses": self.cache_misses,
                "evictions": self.cache_evictions,
                "entries": len(self._diffs),
                "bytes": self.resident_bytes,
            }

    # -- preparing requests (any thread) --------------------------------------------

    def prepare(
        self,
        base: str,
        diffs: Sequence[ResidentDiff],
        inputs: Sequence[str] | Sequence[Sequence[str]],
    ) -> PreparedRequest:
        """Check `inputs` against the task type and tokenise them with the task's max length."""
        held = self.base(base)
        meta = diffs[-1].meta
        texts, pairs = _split_inputs(inputs, meta.task_type)
        encoded = held.loaded.encode(texts, pairs, max_length=meta.max_length)
        return PreparedRequest(
            held, list(diffs), {k: v.to(self.device) for k, v in encoded.items()}
        )

    # -- running batches (the base's owner) ------------------------------------------

    def run_batch(self, requests: Sequence[PreparedRequest]) -> list[list[dict[str, Any]]]:
        """Predictions for each request; requests on one base share one mixed forward."""
        answers = []
        for request, logits in zip(requests, self.batch_logits(requests), strict=True):
            meta = request.task.meta
            answers.append(_decode(logits, meta.task_type, meta.label_names))
        return answers

    def batch_logits(self, requests: Sequence[PreparedRequest]) -> list[torch.Tensor]:
        """Each request's logits (fp32, CPU); requests on one base share one mixed forward."""
        for request in requests:
            if request.task.head is None:
                raise PredictionInputError("this version has no task head to predict with")
        with self.run_lock:
            results: dict[int, torch.Tensor] = {}
            by_base: dict[int, list[tuple[int, PreparedRequest]]] = {}
            for i, request in enumerate(requests):
                if any(d.decoded is None for d in request.diffs):
                    results[i] = self._run_applied(request)
                else:
                    by_base.setdefault(id(request.base), []).append((i, request))
            for group in by_base.values():
                mixed = self._run_mixed([r for _, r in group])
                for (i, _), logits in zip(group, mixed, strict=True):
                    results[i] = logits
            return [results[i] for i in range(len(requests))]

    def _run_mixed(self, requests: list[PreparedRequest]) -> list[torch.Tensor]:
        import torch

        from serving.mixed import Segment

        held = requests[0].base
        # Requests of one diff side by side, so each diff corrects contiguous rows (a slice).
        order = sorted(
            range(len(requests)), key=lambda n: [id(d.decoded) for d in requests[n].diffs]
        )
        ordered = [requests[n] for n in order]
        encoded = _concat_padded(
            [r.encoded for r in ordered], held.loaded.tokenizer.pad_token_id or 0
        )
        segments: list[Segment] = []
        last: dict[int, Segment] = {}
        head_rows: dict[int, tuple[TaskHead, list[int]]] = {}
        start = 0
        for k, request in enumerate(ordered):
            stop = start + request.rows
            for resident in request.diffs:
                segment = last.get(id(resident.decoded))
                if segment is not None and segment.stop == start:
                    segment.stop = stop
                else:
                    segment = Segment(resident.decoded, start, stop)
                    segments.append(segment)
                    last[id(resident.decoded)] = segment
            head_rows.setdefault(id(request.task.head), (request.task.head, []))[1].append(k)
            start = stop
        bounds = [0]
        for request in ordered:
            bounds.append(bounds[-1] + request.rows)
        output = self._timed_forward(held, encoded, segments)
        answers: list[torch.Tensor] = [torch.empty(0)] * len(requests)
        for head, members in head_rows.values():
            rows = torch.cat(
                [torch.arange(bounds[k], bounds[k + 1], device=self.device) for k in members]
            )
            logits = held.heads.logits(head, encoded, output, rows).float().cpu()
            offset = 0
            for k in members:
                answers[order[k]] = logits[offset : offset + ordered[k].rows]
                offset += ordered[k].rows
        return answers

    def _timed_forward(self, held: _ServingBase, encoded, segments) -> Any:
        from serving.stages import mark, since

        start = mark()
        output = held.mixed.forward(encoded, segments)
        cpu, wall = since(start)
        totals = self.stage_times["forward"]
        totals[0] += cpu
        totals[1] += wall
        return output

    def _run_applied(self, request: PreparedRequest) -> torch.Tensor:
        """Apply the request's diffs in place, run, revert (for diffs that are not row-safe)."""
        import torch

        from diffs.apply import apply_diff
        from serving.mixed import Segment

        held, task = request.base, request.task

        rows = torch.arange(request.rows, device=self.device)
        applied = []
        try:
            segments = []
            for resident in request.diffs:
                if resident.decoded is not None:
                    segments.append(Segment(resident.decoded, 0, request.rows))
                else:
                    applied.append(apply_diff(held.model.base_model, resident.diff))
            output = self._timed_forward(held, request.encoded, segments)
            return held.heads.logits(task.head, request.encoded, output, rows).float().cpu()
        finally:
            for item in reversed(applied):
                item.revert()

    def predict_artifact(
        self, data: bytes, inputs: Sequence[str] | Sequence[Sequence[str]], *, base: str
    ) -> list[dict[str, Any]]:
        """Predict with an artifact given as bytes (library mode: applied, run, reverted)."""
        import torch

        from diffs.apply import apply_diff, install_head

        held = self.base(base)
        diff, head = self._read(held, data)
        meta = diff.meta
        texts, pairs = _split_inputs(inputs, meta.task_type)
        with self.run_lock:
            saved_head = install_head(held.model, head)
            applied = apply_diff(held.model.base_model, diff)
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
                install_head(held.model, saved_head)
        return _decode(torch.cat(logits), meta.task_type, meta.label_names)


def applied_nbytes(diff: SparseDiff, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes a diff served by apply/revert holds: its tensors plus its apply plan's.

    Per changed tensor the plan (diffs.apply) keeps a delta in the parameter dtype (a
    factored tensor's whole U Vᵀ + entries, else its values) and a same-sized buffer for the
    overwritten base values, and the indices on the device.
    """
    import math

    import torch

    def size(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    own = sum(size(t) for t in (*diff.indices.values(), *diff.values.values()))
    own += sum(size(u) + size(v) for u, v in diff.factors.values())
    item = torch.empty((), dtype=dtype).element_size()
    plan = 0
    for name in diff.tensor_names:
        if name in diff.factors:
            plan += 2 * math.prod(diff.shapes[name]) * item
            continue
        values, indices = diff.values[name], diff.indices[name]
        cast = values.dtype != dtype or values.device != device  # else the delta is `values`
        plan += values.numel() * item * (2 if cast else 1)
        plan += size(indices) if indices.device != device else 0
    return own + plan


def _concat_padded(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tokenised batches stacked on rows, right-padded to the longest (ids with `pad_id`)."""
    import torch

    if len(parts) == 1:
        return parts[0]
    width = max(int(p["input_ids"].shape[1]) for p in parts)
    merged = {}
    for key in parts[0]:
        fill = pad_id if key == "input_ids" else 0
        merged[key] = torch.cat(
            [
                torch.nn.functional.pad(p[key], (0, width - p[key].shape[1]), value=fill)
                for p in parts
            ]
        )
    return merged


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
