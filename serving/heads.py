"""Task heads on a shared encoder's output: one head template per (task type, labels), the
task's dense head tensors swapped in, the encoder replaced by a stand-in replaying its output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffs.apply import install_head


@dataclass(eq=False)
class TaskHead:
    """A task's dense head tensors, in the model's dtype and device, and its output layout."""

    tensors: dict[str, torch.Tensor]
    task_type: str
    num_labels: int
    nbytes: int


class HeadRunner:
    """Runs task heads on encoder outputs, one template model per (task type, labels); used by
    the base's owner only (the predictor's `run_lock`)."""

    def __init__(self, build_model, base_prefix: str) -> None:
        self._build = build_model  # (task_type, num_labels) -> classification model
        self._prefix = base_prefix
        self._templates: dict[tuple[str, int], tuple[nn.Module, _Replay]] = {}

    def _template(self, task_type: str, num_labels: int):
        key = (task_type, num_labels)
        if key not in self._templates:
            model = self._build(task_type, num_labels)
            replay = _Replay()
            setattr(model, self._prefix, replay)
            model.eval().requires_grad_(False)
            self._templates[key] = (model, replay)
        return self._templates[key]

    def logits(
        self, head: TaskHead, encoded: dict[str, torch.Tensor], output: Any, rows: torch.Tensor
    ) -> torch.Tensor:
        """The head's logits for `rows` of the batch, given the encoder's output for the batch."""
        model, replay = self._template(head.task_type, head.num_labels)
        install_head(model, head.tensors)
        replay.output = _select_rows(output, rows)
        try:
            sub = {k: v.index_select(0, rows) for k, v in encoded.items()}
            with torch.inference_mode():
                return model(**sub).logits
        finally:
            replay.output = None


class _Replay(nn.Module):
    """Stands in for the encoder inside a head template: returns a precomputed output."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _select_rows(output: Any, rows: torch.Tensor) -> Any:
    """An encoder output (ModelOutput) restricted to `rows` of its batch."""
    fields = {
        key: value.index_select(0, rows) if isinstance(value, torch.Tensor) else value
        for key, value in output.items()
    }
    return type(output)(**fields)
