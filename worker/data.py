"""A task's data: a training table and a validation table, from a file or a directory.

A directory holds `train.<ext>` and optionally `validation.<ext>` (ext: jsonl, csv,
parquet). Without a validation file a seeded split is carved from the training rows,
stratified by label for classification.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets_io.tabular import FORMATS, ColumnMapping, DatasetError, Table, TableLimits, read_table

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


@dataclass
class TaskData:
    """Training and validation tables of one task, sharing one label set."""

    train: Table
    validation: Table
    task_type: str
    label_names: list[str]
    validation_source: str = "file"  # "file" or "split"

    @property
    def num_labels(self) -> int:
        """Classifier outputs: the number of labels, or 1 for regression."""
        return 1 if self.task_type == "regression" else len(self.label_names)

    def to_datasets(self) -> Any:
        """The two tables as a Hugging Face `datasets.DatasetDict` (columns text[, text_pair], label)."""
        import datasets

        def as_dataset(table: Table) -> datasets.Dataset:
            columns: dict[str, list] = {"text": table.texts}
            if table.text_pairs is not None:
                columns["text_pair"] = table.text_pairs
            columns["label"] = table.labels if self.task_type == "regression" else table.label_ids()
            return datasets.Dataset.from_dict(columns)

        return datasets.DatasetDict(
            train=as_dataset(self.train), validation=as_dataset(self.validation)
        )


@dataclass(frozen=True)
class SampleTask:
    """A shipped sample task: where it lives and how to read it (from manifest.json)."""

    name: str
    path: Path
    task_type: str
    mapping: ColumnMapping
    description: str
    train_rows: int
    validation_rows: int


def _sample_manifest() -> dict[str, dict]:
    return json.loads((SAMPLES_DIR / "manifest.json").read_text(encoding="utf-8"))


def sample_task_names() -> list[str]:
    """Names of the shipped sample tasks."""
    return sorted(_sample_manifest())


def sample_task(name: str) -> SampleTask:
    """The shipped sample task `name` (see worker/samples/SOURCES.md)."""
    manifest = _sample_manifest()
    if name not in manifest:
        raise DatasetError(
            "missing_file",
            f"no sample task {name!r} (known: {', '.join(sorted(manifest))})",
            file=str(SAMPLES_DIR / name),
        )
    entry = manifest[name]
    return SampleTask(
        name=name,
        path=SAMPLES_DIR / name,
        task_type=entry["task_type"],
        mapping=ColumnMapping(
            text_field=entry["text_field"],
            text_pair_field=entry["text_pair_field"],
            label_field=entry["label_field"],
        ),
        description=entry["description"],
        train_rows=entry["train_rows"],
        validation_rows=entry["validation_rows"],
    )


def load_sample_task(name: str, *, limits: TableLimits | None = None) -> TaskData:
    """The train and validation tables of a shipped sample task."""
    task = sample_task(name)
    return load_task_data(task.path, mapping=task.mapping, task_type=task.task_type, limits=limits)


def find_split_file(directory: Path, split: str) -> Path | None:
    """The single `<split>.<ext>` file of a dataset directory, or None when there is none."""
    found = [
        directory / f"{split}{ext}" for ext in FORMATS if (directory / f"{split}{ext}").is_file()
    ]
    if len(found) > 1:
        raise DatasetError(
            "ambiguous_file",
            f"more than one {split} file: {', '.join(p.name for p in found)}",
            file=str(directory),
        )
    return found[0] if found else None


def load_task_data(
    path: Path | str,
    *,
    mapping: ColumnMapping | None = None,
    task_type: str | None = None,
    validation_path: Path | str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    limits: TableLimits | None = None,
) -> TaskData:
    """Read a task's train and validation tables from a file or a `train.*` directory."""
    mapping = mapping or ColumnMapping()
    if limits is None:
        from settings import get_settings

        limits = TableLimits.from_settings(get_settings())
    path = Path(path)
    if path.is_dir():
        train_path = find_split_file(path, "train")
        if train_path is None:
            raise DatasetError(
                "missing_file",
                f"the directory has no train file (train{', train'.join(FORMATS)})",
                file=str(path),
            )
        if validation_path is None:
            validation_path = find_split_file(path, "validation")
    elif path.is_file():
        train_path = path
    else:
        raise DatasetError("missing_file", "no such file or directory", file=str(path))

    train = read_table(train_path, mapping=mapping, task_type=task_type, limits=limits)
    if validation_path is not None:
        validation = read_table(
            Path(validation_path),
            mapping=mapping,
            task_type=train.task_type,
            limits=limits,
            label_names=train.label_names if train.task_type != "regression" else None,
        )
        source = "file"
    else:
        train, validation = split_table(train, fraction=validation_fraction, seed=seed)
        source = "split"
    return TaskData(
        train=train,
        validation=validation,
        task_type=train.task_type,
        label_names=train.label_names,
        validation_source=source,
    )


def split_table(table: Table, *, fraction: float, seed: int) -> tuple[Table, Table]:
    """Seeded train/validation split; stratified by label for classification.

    Validation gets max(1, round(fraction * rows)) rows, shared among the labels in
    proportion to their counts (largest remainders first), never a label's last row, so
    every label stays in training.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    if table.task_type == "regression":
        groups = {"": list(range(table.rows))}
    else:
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, label in enumerate(table.labels):
            by_label[label].append(i)
        groups = {label: by_label[label] for label in sorted(by_label)}

    quotas = _stratified_quotas({k: len(v) for k, v in groups.items()}, fraction)
    if sum(quotas.values()) == 0:
        raise DatasetError(
            "too_few_rows",
            f"{table.rows} rows are too few to carve a validation split "
            "(every label needs two rows); add rows or give a validation file",
            file=table.filename,
        )
    rng = random.Random(seed)
    held_out: list[int] = []
    for label, indices in groups.items():
        shuffled = indices[:]
        rng.shuffle(shuffled)
        held_out.extend(shuffled[: quotas[label]])
    held = set(held_out)
    train_idx = [i for i in range(table.rows) if i not in held]
    return table.select(train_idx), table.select(sorted(held))


def _stratified_quotas(counts: dict[str, int], fraction: float) -> dict[str, int]:
    """Validation rows per group: proportional, largest remainders, at most count - 1 each."""
    total = sum(counts.values())
    capacity = {k: max(n - 1, 0) for k, n in counts.items()}
    wanted = min(max(1, round(fraction * total)), sum(capacity.values()))
    exact = {k: wanted * n / total for k, n in counts.items()}
    quotas = {k: min(int(exact[k]), capacity[k]) for k in counts}
    by_remainder = sorted(counts, key=lambda k: (-(exact[k] - int(exact[k])), k))
    while sum(quotas.values()) < wanted:
        for k in by_remainder:
            if quotas[k] < capacity[k] and sum(quotas.values()) < wanted:
                quotas[k] += 1
    return quotas
