"""`diffbank train`: artifact on disk, one JSON summary line, data errors exit 2 without a traceback."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from cli import main
from diffs.read import load_artifact
from tests.test_trainer import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def training_rows(path) -> int:
    """Rows the trainer trains on (the seeded validation split taken out)."""
    from datasets_io.tabular import ColumnMapping
    from worker.data import load_task_data

    return load_task_data(path, mapping=ColumnMapping(), seed=0).train.rows


def test_train_json_reports_the_saved_artifact(tmp_path, tiny_base_dir, capsys):
    data = write_sentiment_task(tmp_path / "data.jsonl", 60, seed=0)
    out = tmp_path / "out" / "task.safetensors"
    code = main(
        [
            "train",
            str(data),
            "--out",
            str(out),
            "--base",
            str(tiny_base_dir),
            "--density",
            "0.01",
            "--epochs",
            "1",
            "--fix-epochs",
            "1",
            "--batch-size",
            "16",
            "--max-length",
            "16",
            "--fix-lr",
            "0.004",
            "--no-compile",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out.strip().splitlines()[-1])
    diff = load_artifact(out)
    assert summary["nnz"] == diff.nnz == round(0.01 * summary["n_params"])
    assert summary["bytes"] == out.stat().st_size
    assert summary["metric_name"] == "accuracy"
    assert summary["accuracy"] == summary["metric"] == diff.meta.metrics["accuracy"]
    assert summary["density"] == pytest.approx(0.01, rel=1e-3)
    assert summary["train_seconds"] > 0 and summary["peak_memory_bytes"] > 0
    assert diff.meta.config["fix_lr"] == 0.004 and diff.meta.config["epochs"] == 1
    # the explicit epochs are honoured exactly: one pass each, batch 16
    per_epoch = math.ceil(training_rows(data) / 16)
    assert summary["prune_steps"] == summary["fix_steps"] == per_epoch
    assert diff.meta.config["prune_steps"] == diff.meta.config["fix_steps"] == per_epoch
    assert 0.0 <= summary["gate_open_fraction"] <= 1.0
    assert summary["expected_nnz_at_projection"] <= summary["n_params"]
    assert "train" in captured.err  # the progress bar


def test_train_data_error_exits_2_with_the_message_and_no_traceback(tmp_path, tiny_base_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "only text, no label"}\n')
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "train",
            str(data),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--base",
            str(tiny_base_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "label" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_train_rejects_an_impossible_density(tmp_path, capsys):
    data = write_sentiment_task(tmp_path / "data.jsonl", 10, seed=0)
    code = main(["train", str(data), "--out", str(tmp_path / "x.safetensors"), "--density", "2"])
    assert code == 2
    assert "density" in capsys.readouterr().err


def test_train_with_only_epochs_runs_them_exactly_and_the_fixed_phase_auto(
    tmp_path, tiny_base_dir, capsys
):
    from worker.diffprune.config import AUTO_MIN_FIX_STEPS

    data = write_sentiment_task(tmp_path / "data.jsonl", 60, seed=0)
    out = tmp_path / "task.safetensors"
    args = ["train", str(data), "--out", str(out), "--base", str(tiny_base_dir)]
    args += ["--density", "0.01", "--epochs", "2", "--batch-size", "16", "--max-length", "16"]
    code = main([*args, "--no-compile", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prune_steps"] == 2 * math.ceil(training_rows(data) / 16)
    per_epoch = math.ceil(training_rows(data) / 16)
    assert summary["fix_steps"] == max(AUTO_MIN_FIX_STEPS, 5 * per_epoch)  # auto: 5 epochs
    assert load_artifact(out).meta.config["epochs"] == 2


def test_train_rejects_an_unknown_mask_method(tmp_path, capsys):
    data = write_sentiment_task(tmp_path / "data.jsonl", 10, seed=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(data), "--out", str(tmp_path / "x"), "--mask-method", "bogus"])
    assert exit_info.value.code == 2
    assert "mask-method" in capsys.readouterr().err
