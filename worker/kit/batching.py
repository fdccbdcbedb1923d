"""Training batches: seeded per-epoch shuffles of a table's rows, tokenised rows, label tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from datasets_io.tabular import Table
from diffs.basemodel import LoadedBase


def epoch_batches(rows: int, batch_size: int, seed: int) -> list[Tensor]:
    """Row indices of one epoch in the order seeded by `seed`, split into batches."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch_size))


def encode_rows(
    base: LoadedBase,
    table: Table,
    rows: Tensor | list[int],
    max_length: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """Tokenise some rows of a table (pairs when the table has them), padded to the longest."""
    rows = [int(i) for i in rows]
    texts = [table.texts[i] for i in rows]
    pairs = None if table.text_pairs is None else [table.text_pairs[i] for i in rows]
    encoded = base.encode(texts, pairs, max_length=max_length)
    return {key: value.to(device) for key, value in encoded.items()}


def label_tensor(table: Table, task_type: str) -> Tensor:
    """All labels of a table: class ids (int64) or regression targets (float32)."""
    if task_type == "regression":
        return torch.tensor([float(x) for x in table.labels], dtype=torch.float32)
    return torch.tensor(table.label_ids(), dtype=torch.int64)
