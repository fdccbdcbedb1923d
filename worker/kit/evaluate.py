"""Validation metrics of a model (optionally with substituted parameters) on a table."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from datasets_io.tabular import Table
from diffs.basemodel import LoadedBase
from worker.kit.batching import encode_rows, label_tensor
from worker.kit.metrics import task_metrics
from worker.kit.model import autocast_for


@torch.no_grad()
def evaluate(
    model: nn.Module,
    table: Table,
    *,
    base: LoadedBase,
    task_type: str,
    num_labels: int,
    max_length: int,
    batch_size: int = 64,
    params: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Metrics of `model` (with `params` substituted, if given) on a table; restores the mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list = []
    try:
        for start in range(0, table.rows, batch_size):
            rows = list(range(start, min(start + batch_size, table.rows)))
            batch = encode_rows(base, table, rows, max_length, device)
            with autocast_for(device):
                if params is None:
                    logits = model(**batch).logits
                else:
                    logits = functional_call(model, params, args=(), kwargs=batch).logits
            logits = logits.float()
            if task_type == "regression":
                predictions.extend(logits.squeeze(-1).cpu().tolist())
            else:
                predictions.extend(logits.argmax(-1).cpu().tolist())
    finally:
        model.train(was_training)
    labels = label_tensor(table, task_type).tolist()
    return task_metrics(task_type, predictions, labels, num_labels)
