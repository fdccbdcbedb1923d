"""An artifact whose meta disagrees with its own head or its base is refused on every read path.

The checksum is unkeyed, so each tampered file here is re-written with a valid digest: it is
simply a file a user made. `inspect`, `predict`, `export` and the serving API all refuse it
with one clear error (no traceback, no wrong labels, no crash on a long input).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from diffs.read import loads_artifact
from diffs.write import dumps_artifact
from tests.api_support import make_world, publish_artifact, random_artifact

LABELS = ("a", "b", "c")


def _tampered(base_dir, **meta_changes) -> bytes:
    """A 3-class artifact on the tiny base with its meta edited and its digest re-written."""
    diff = loads_artifact(
        random_artifact(base_dir, seed=7, task_type="classification", labels=LABELS, density=0.02)
    )
    return dumps_artifact(
        dataclasses.replace(diff, meta=dataclasses.replace(diff.meta, **meta_changes))
    )


TAMPERED = [
    # (id, meta changes, words the error must contain)
    ("fewer_labels_than_head_rows", {"label_names": ["a", "b"]}, "2 labels"),
    ("more_labels_than_head_rows", {"label_names": ["a", "b", "c", "d"]}, "4 labels"),
    (
        "regression_on_a_classification_head",
        {"task_type": "regression", "label_names": []},
        "regression",
    ),
    ("max_length_beyond_the_positions", {"max_length": 100_000}, "max_length"),
]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *argv], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("changes", "words"), [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED]
)
def test_a_tampered_artifact_is_refused_by_predict_and_export(
    tiny_base_dir, tmp_path, changes, words
):
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(_tampered(tiny_base_dir, **changes))
    for argv in (
        ("predict", str(path), "a fine film", "--base", str(tiny_base_dir)),
        ("export", str(path), str(tmp_path / "out"), "--base", str(tiny_base_dir)),
    ):
        run = _cli(*argv)
        assert run.returncode == 1, (argv[0], run.stdout, run.stderr)
        assert words in run.stderr and "Traceback" not in run.stderr, (argv[0], run.stderr)
        assert run.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "words"), [c[1:] for c in TAMPERED[:3]], ids=[c[0] for c in TAMPERED[:3]]
)
def test_inspect_refuses_a_meta_that_disagrees_with_its_own_head(
    tiny_base_dir, tmp_path, changes, words
):
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(_tampered(tiny_base_dir, **changes))
    run = _cli("inspect", str(path))
    assert run.returncode == 1 and words in run.stderr and "Traceback" not in run.stderr


@pytest.mark.services
@pytest.mark.parametrize(
    ("changes", "words"), [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED]
)
def test_the_api_refuses_to_serve_a_tampered_version(
    tiny_base_dir, tmp_path, redis_server, changes, words
):
    world = make_world(tmp_path, redis_server.url, tiny_base_dir)
    task_type = changes.get("task_type", "classification")
    labels = list(changes.get("label_names", LABELS))
    data = _tampered(tiny_base_dir, **changes)
    publish_artifact(world, "alice", "tampered", data, task_type=task_type, labels=labels)
    response = world.client.post(
        "/v1/tasks/tampered/predict", headers=world.headers("alice"), json={"inputs": ["a film"]}
    )
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "artifact_mismatch" and words in error["message"]
