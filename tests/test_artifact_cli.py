"""`diffbank inspect` and `diffbank export` on real artifact files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main
from diffs.apply import apply_diff
from diffs.basemodel import build_model, load_base
from diffs.write import dumps_artifact, save_artifact
from tests.fixtures.models import make_tiny_bert
from tests.test_artifact import random_diff


@pytest.fixture(scope="module")
def artifact_file(tiny_base_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("artifacts") / "sentiment.safetensors"
    save_artifact(random_diff(load_base(str(tiny_base_dir)), density=0.01, seed=4), path)
    return path


def last_json_line(stdout: str) -> dict:
    """The JSON object a `--json` command prints as its last line."""
    return json.loads(stdout.strip().splitlines()[-1])


def test_inspect_json_reports_metadata_and_nonzeros_per_tensor(artifact_file, capsys):
    assert main(["inspect", str(artifact_file), "--json"]) == 0
    info = last_json_line(capsys.readouterr().out)
    assert info["meta"]["label_names"] == ["negative", "positive"]
    assert info["meta"]["extra"] == {"lineage": {"job": 7}}
    assert sum(row["nnz"] for row in info["tensors"]) == info["meta"]["nnz"] > 0
    assert info["file_bytes"] == artifact_file.stat().st_size
    assert info["bytes_per_nnz"] == pytest.approx(info["file_bytes"] / info["meta"]["nnz"])
    assert set(info["head"]) == {"classifier.weight", "classifier.bias"}


def test_inspect_prints_a_table_and_draws_a_heatmap(artifact_file, tmp_path, capsys):
    plot = tmp_path / "where.png"
    assert main(["inspect", str(artifact_file), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.1.output.dense.weight" in out
    assert "float16" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_of_a_corrupt_file_names_the_problem_without_a_traceback(artifact_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(artifact_file.read_bytes()[:100])
    result = subprocess.run(
        [sys.executable, "-m", "cli", "inspect", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: truncated file")
    assert "Traceback" not in result.stderr


def test_export_writes_a_model_directory_transformers_loads_with_labels(
    artifact_file, tiny_base_dir, tmp_path, capsys
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from diffs.read import load_artifact

    out = tmp_path / "exported"
    assert main(["export", str(artifact_file), str(out), "--base", str(tiny_base_dir)]) == 0
    capsys.readouterr()
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert exported.config.id2label == {0: "negative", 1: "positive"}

    base = load_base(str(tiny_base_dir))
    diff = load_artifact(artifact_file)
    shared = build_model(base, task_type="classification", num_labels=2).eval()
    shared.classifier.load_state_dict(
        {k.removeprefix("classifier."): v for k, v in diff.head.items()}
    )
    inputs = tokenizer(["sunny and warm", "cold"], return_tensors="pt", padding=True)
    with torch.no_grad(), apply_diff(shared.base_model, diff):
        expected = shared(**inputs).logits
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, expected)


def test_export_onto_the_wrong_base_is_refused(artifact_file, tmp_path, capsys):
    other = make_tiny_bert(tmp_path / "other-base", seed=9)
    assert main(["export", str(artifact_file), str(tmp_path / "out"), "--base", str(other)]) == 1
    assert "wrong base" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_without_a_findable_base_asks_for_one(tiny_base_dir, tmp_path, capsys):
    base = load_base(str(tiny_base_dir))
    diff = random_diff(base, density=0.001)
    diff.meta.base_name = "no-such-base-anywhere"
    path = tmp_path / "orphan.safetensors"
    path.write_bytes(dumps_artifact(diff))
    assert main(["export", str(path), str(tmp_path / "out")]) == 1
    assert "--base" in capsys.readouterr().err


def test_inspect_piped_into_a_reader_that_stops_early_ends_without_a_traceback(artifact_file):
    # A pipe buffer is 64 KiB: read one line and close, then the rest of the table hits EPIPE.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "inspect", str(artifact_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) in (0, 141)
    assert b"Traceback" not in err


def _existing(tmp_path: Path, kind: str) -> Path:
    """`tmp_path/out` as a user file, a directory holding one, or an empty directory."""
    out = tmp_path / "out"
    if kind == "file":
        out.write_bytes(b"mine")
    else:
        out.mkdir()
        if kind == "dir":
            (out / "config.json").write_bytes(b"mine")
    return out


# (id, argv given the artifact, the output path and the base, what is there, exit status)
OUTPUT_CASES = [
    ("export_into_a_non_empty_dir", lambda a, o, b: ["export", a, o, "--base", b], "dir", 1),
    (
        "export_into_a_non_empty_dir_with_force",
        lambda a, o, b: ["export", a, o, "--base", b, "--force"],
        "dir",
        0,
    ),
    ("export_into_an_empty_dir", lambda a, o, b: ["export", a, o, "--base", b], "empty", 0),
    ("export_onto_a_file", lambda a, o, b: ["export", a, o, "--base", b, "--force"], "file", 1),
    ("inspect_plot_over_a_file", lambda a, o, b: ["inspect", a, "--plot", o], "file", 1),
    (
        "inspect_plot_over_a_file_with_force",
        lambda a, o, b: ["inspect", a, "--plot", o, "--force"],
        "file",
        0,
    ),
    ("inspect_plot_onto_a_dir", lambda a, o, b: ["inspect", a, "--plot", o, "--force"], "dir", 1),
    ("train_out_over_a_file", lambda a, o, b: ["train", a, "--out", o, "--base", b], "file", 2),
    (
        "interference_plot_over_a_file",
        lambda a, o, b: ["interference", a, a, "--plot", o],
        "file",
        1,
    ),
]


@pytest.mark.parametrize(
    "argv,kind,status", [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES]
)
def test_commands_replace_existing_outputs_only_with_force(
    artifact_file, tiny_base_dir, tmp_path, capsys, argv, kind, status
):
    out = _existing(tmp_path, kind)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir()) if kind != "file" else None
    assert main([str(x) for x in argv(artifact_file, out, tiny_base_dir)]) == status
    err = capsys.readouterr().err
    if status == 0:
        return
    assert err.startswith("error: ") and str(out) in err, err
    if kind == "file":
        assert out.read_bytes() == b"mine"
    else:
        assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    if "--force" not in [str(x) for x in argv(artifact_file, out, tiny_base_dir)]:
        assert "--force" in err
