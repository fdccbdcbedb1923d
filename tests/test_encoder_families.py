"""Every common encoder family trains, predicts, exports and serves through the API.

Each family is a tiny random config saved the way `AutoModel.save_pretrained` saves a hub
encoder. N and the fingerprint cover exactly the tensors the classification model runs.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli import main as diffbank
from diffs.basemodel import UnsupportedBaseError, build_model, load_base
from diffs.read import load_artifact
from tests.api_support import make_world, publish_artifact
from tests.fixtures.models import ENCODER_FAMILIES, make_tiny_family_base
from tests.test_trainer import write_sentiment_task

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.services]

TEXTS = ["good fine great film", "bad awful dull plot", "a film", "great great"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """One saved tiny base per family."""
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_family_base(family, root / family) for family in ENCODER_FAMILIES}


def _run_json(capsys, *argv: str) -> dict:
    assert diffbank([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _exported_labels(outdir, texts: list[str]) -> list[str]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(outdir).eval()
    base = load_base(str(outdir))
    with torch.no_grad():
        logits = model(**base.encode(texts, None, max_length=16)).logits
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_family_trains_predicts_exports_and_serves(
    family, family_dirs, tmp_path, capsys, redis_server
):
    base_dir = family_dirs[family]
    base = load_base(str(base_dir))
    model = build_model(base, task_type="classification", num_labels=2)
    used = {name for name, _ in model.base_model.named_parameters()}
    assert base.n_params == sum(p.numel() for p in model.base_model.parameters())
    assert set(base.shapes) == used  # an unused pretrained pooler is neither counted nor stored

    data = write_sentiment_task(tmp_path / "train.jsonl", 48, seed=0)
    artifact = tmp_path / "task.safetensors"
    summary = _run_json(
        capsys,
        "train",
        str(data),
        "--base",
        str(base_dir),
        "--out",
        str(artifact),
        "--density",
        "0.05",
        "--epochs",
        "1",
        "--fix-epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
    )
    diff = load_artifact(artifact)
    assert summary["n_params"] == diff.meta.n_params == base.n_params
    assert set(diff.indices) <= used
    assert diff.meta.base_fingerprint == base.fingerprint

    predicted = _run_json(capsys, "predict", str(artifact), *TEXTS, "--base", str(base_dir))
    labels = [p["label"] for p in predicted["predictions"]]
    assert set(labels) <= {"neg", "pos"}

    outdir = tmp_path / "merged"
    _run_json(capsys, "export", str(artifact), str(outdir), "--base", str(base_dir))
    assert _exported_labels(outdir, TEXTS) == labels

    world = make_world(tmp_path / "api", redis_server.url, base_dir)
    publish_artifact(
        world,
        "alice",
        "sentiment",
        artifact.read_bytes(),
        task_type="classification",
        labels=["neg", "pos"],
    )
    response = world.client.post(
        "/v1/tasks/sentiment/predict", headers=world.headers("alice"), json={"inputs": TEXTS}
    )
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert [p["label"] for p in served] == labels
    for local, remote in zip(predicted["predictions"], served, strict=True):
        assert remote["score"] == pytest.approx(local["score"], abs=1e-5)


def test_an_architecture_without_a_classification_head_is_named(tmp_path):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from diffs.basemodel import resolve_base_path

    out = tmp_path / "clip-text"
    config = CLIPTextConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    CLIPTextModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_base_path("all-MiniLM-L6-v2")).save_pretrained(out)
    with pytest.raises(UnsupportedBaseError, match="'clip_text_model'"):
        load_base(str(out))
