"""worker.data: task data from files or directories, the seeded split, and the shipped samples."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from datasets_io.tabular import ColumnMapping, DatasetError, TableLimits
from worker.data import (
    SAMPLES_DIR,
    load_sample_task,
    load_task_data,
    sample_task,
    sample_task_names,
    split_table,
)

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled_rows(counts: dict[str, int]) -> list[dict]:
    rows = [
        {"text": f"{label} example {i}", "label": label}
        for label in counts
        for i in range(counts[label])
    ]
    random.Random(1).shuffle(rows)
    return rows


# --- files and directories -------------------------------------------------------------


def test_directory_with_train_and_validation_uses_both_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 5, "b": 5}))
    (tmp_path / "validation.csv").write_text("text,label\nx,a\ny,b\nz,a\n", encoding="utf-8")
    data = load_task_data(tmp_path, limits=TableLimits())
    assert data.validation_source == "file"
    assert (data.train.rows, data.validation.rows) == (10, 3)
    assert data.label_names == ["a", "b"]
    assert data.validation.label_ids() == [0, 1, 0]
    assert data.task_type == "classification"
    assert data.num_labels == 2


def test_directory_with_only_train_carves_a_validation_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 30, "b": 10}))
    data = load_task_data(tmp_path, validation_fraction=0.2, seed=3, limits=TableLimits())
    assert data.validation_source == "split"
    assert (data.train.rows, data.validation.rows) == (32, 8)
    assert set(data.train.texts).isdisjoint(data.validation.texts)


def test_single_file_is_split_and_an_explicit_validation_file_is_used(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "mine.jsonl", labelled_rows({"a": 10, "b": 10}))
    validation = write_jsonl(tmp_path / "held.jsonl", [{"text": "q", "label": "b"}])
    assert load_task_data(train, limits=TableLimits()).validation_source == "split"
    data = load_task_data(train, validation_path=validation, limits=TableLimits())
    assert data.validation_source == "file"
    assert data.validation.texts == ["q"]


def test_directory_without_a_train_file_is_rejected(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "validation.jsonl", labelled_rows({"a": 2, "b": 2}))
    with pytest.raises(DatasetError) as caught:
        load_task_data(tmp_path, limits=TableLimits())
    assert caught.value.code == "missing_file"
    assert str(tmp_path) in str(caught.value)


def test_directory_with_two_train_files_is_rejected(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 2, "b": 2}))
    (tmp_path / "train.csv").write_text("text,label\nx,a\ny,b\n", encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_task_data(tmp_path, limits=TableLimits())
    assert caught.value.code == "ambiguous_file"
    assert "train.csv" in str(caught.value) and "train.jsonl" in str(caught.value)


def test_validation_label_never_seen_in_training_is_rejected_naming_file_and_line(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 3, "b": 3}))
    write_jsonl(
        tmp_path / "validation.jsonl",
        [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}],
    )
    with pytest.raises(DatasetError) as caught:
        load_task_data(tmp_path, limits=TableLimits())
    error = caught.value
    assert (error.code, error.line, error.field) == ("unknown_label", 2, "label")
    assert "validation.jsonl" in str(error) and "'c'" in str(error)


def test_validation_file_is_read_with_the_training_task_type(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i * 0.5} for i in range(6)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "v", "label": 2}])
    data = load_task_data(tmp_path, limits=TableLimits())
    assert data.task_type == "regression"
    assert data.validation.labels == [2.0]
    assert data.num_labels == 1


def test_limits_apply_to_task_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 4, "b": 4}))
    with pytest.raises(DatasetError) as caught:
        load_task_data(tmp_path, limits=TableLimits(max_rows=5))
    assert caught.value.code == "too_many_rows"


# --- the seeded split ------------------------------------------------------------------


def test_seeded_split_is_reproducible_and_the_seed_matters(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 40, "b": 40}))
    first = load_task_data(path, seed=7, limits=TableLimits())
    again = load_task_data(path, seed=7, limits=TableLimits())
    other = load_task_data(path, seed=8, limits=TableLimits())
    assert first.validation.texts == again.validation.texts
    assert first.train.texts == again.train.texts
    assert first.validation.texts != other.validation.texts


def test_split_is_stratified_and_keeps_every_label_in_training(tmp_path: Path) -> None:
    counts = {"big": 60, "mid": 30, "small": 8, "rare": 1}
    path = write_jsonl(tmp_path / "train.jsonl", labelled_rows(counts))
    data = load_task_data(path, validation_fraction=0.25, seed=0, limits=TableLimits())
    held = Counter(data.validation.labels)
    assert held == {"big": 15, "mid": 8, "small": 2}  # round(0.25 * n); 'rare' stays in train
    assert Counter(data.train.labels) == {"big": 45, "mid": 22, "small": 6, "rare": 1}
    assert data.label_names == ["big", "mid", "rare", "small"]
    assert data.validation.label_names == data.train.label_names
    assert sorted(data.train.texts + data.validation.texts) == sorted(
        r["text"] for r in labelled_rows(counts)
    )


def test_regression_split_takes_the_fraction_at_random(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": float(i)} for i in range(50)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_task_data(path, validation_fraction=0.2, seed=1, limits=TableLimits())
    assert data.validation.rows == 10
    assert data.validation.labels != [float(i) for i in range(10)]


def test_too_few_rows_to_split_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "tiny.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    )
    with pytest.raises(DatasetError) as caught:
        load_task_data(path, limits=TableLimits())
    assert caught.value.code == "too_few_rows"
    assert "tiny.jsonl" in str(caught.value)


def test_split_fraction_outside_zero_one_is_a_value_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 5, "b": 5}))
    table = load_task_data(path, limits=TableLimits()).train
    with pytest.raises(ValueError, match="validation_fraction"):
        split_table(table, fraction=1.0, seed=0)


def test_pair_task_keeps_pairs_aligned_through_the_split(tmp_path: Path) -> None:
    rows = [{"q": f"q{i}", "a": f"a{i}", "y": str(i % 2)} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    mapping = ColumnMapping(text_field="q", text_pair_field="a", label_field="y")
    data = load_task_data(path, mapping=mapping, limits=TableLimits())
    assert data.task_type == "pair-classification"
    for table in (data.train, data.validation):
        assert [t[1:] for t in table.texts] == [p[1:] for p in table.text_pairs]


def test_task_data_converts_to_a_datasets_dict(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", labelled_rows({"a": 3, "b": 3}))
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "v", "label": "b"}])
    converted = load_task_data(tmp_path, limits=TableLimits()).to_datasets()
    assert converted["validation"][0] == {"text": "v", "label": 1}
    assert converted["train"].num_rows == 6


# --- shipped sample tasks --------------------------------------------------------------


def test_every_sample_task_loads_with_the_sizes_in_its_manifest() -> None:
    names = sample_task_names()
    assert len(names) >= 4
    for name in names:
        task = sample_task(name)
        data = load_sample_task(name, limits=TableLimits())
        assert data.validation_source == "file"
        assert data.task_type == task.task_type
        assert (data.train.rows, data.validation.rows) == (task.train_rows, task.validation_rows)
        assert set(data.train.texts).isdisjoint(data.validation.texts), name


def test_samples_have_the_promised_kinds_and_sizes() -> None:
    tasks = {name: load_sample_task(name, limits=TableLimits()) for name in sample_task_names()}
    single = [
        d
        for d in tasks.values()
        if d.task_type == "classification"
        and 300 <= d.train.rows <= 2000
        and 200 <= d.validation.rows <= 500
    ]
    assert len(single) >= 2
    demo = tasks["movie-sentiment"]
    assert demo.label_names == ["negative", "positive"]
    assert Counter(demo.train.labels) == {"negative": 1000, "positive": 1000}
    assert any(d.train.rows <= 200 for d in tasks.values())
    assert {"pair-classification", "regression"} <= {d.task_type for d in tasks.values()}
    total = sum(p.stat().st_size for p in SAMPLES_DIR.rglob("*") if p.is_file())
    assert total < 3 * 1024 * 1024


def test_no_sample_text_is_shared_between_tasks() -> None:
    seen: dict[str, str] = {}
    for name in sample_task_names():
        data = load_sample_task(name, limits=TableLimits())
        texts = set()
        for table in (data.train, data.validation):
            texts.update(table.texts)
            texts.update(table.text_pairs or [])
        for text in texts:
            assert seen.setdefault(text, name) == name, f"{text!r} in {seen[text]} and {name}"


def test_sources_document_names_every_sample_task_and_its_licence() -> None:
    sources = (SAMPLES_DIR / "SOURCES.md").read_text(encoding="utf-8")
    assert "vaderSentiment" in sources and "3.3.2" in sources and "MIT" in sources
    for name in sample_task_names():
        assert f"`{name}`" in sources


def test_unknown_sample_task_is_rejected_listing_the_known_ones() -> None:
    with pytest.raises(DatasetError) as caught:
        sample_task("no-such-task")
    assert caught.value.code == "missing_file"
    assert "movie-sentiment" in str(caught.value)


def _make_samples_module():
    spec = importlib.util.spec_from_file_location(
        "make_samples", REPO / "scripts" / "make_samples.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_samples"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def test_sample_generator_is_deterministic_and_matches_the_shipped_manifest(tmp_path: Path) -> None:
    make_samples = _make_samples_module()
    rng = random.Random(0)
    sizes = {"movie": 4000, "product": 1200, "news": 1500, "tweet": 2600}
    sets = {
        source: [
            make_samples.Snippet(f"{i}", round(rng.uniform(-4, 4), 2), f"{source} sentence {i}")
            for i in range(n)
        ]
        for source, n in sizes.items()
    }
    first = make_samples.write_samples(make_samples.build_tasks(sets), tmp_path / "a")
    second = make_samples.write_samples(make_samples.build_tasks(sets), tmp_path / "b")
    assert first == second
    for name in first:
        for split in ("train", "validation"):
            a = (tmp_path / "a" / name / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / name / f"{split}.jsonl").read_bytes()
    assert set(first) == set(sample_task_names())
    shipped = json.loads((SAMPLES_DIR / "manifest.json").read_text(encoding="utf-8"))
    for name, entry in first.items():
        assert {k: entry[k] for k in ("task_type", "train_rows", "validation_rows")} == {
            k: shipped[name][k] for k in ("task_type", "train_rows", "validation_rows")
        }
