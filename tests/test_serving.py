"""Prediction serving: API predictions equal the exported merged model's; hot swap keeps the base exact."""

from __future__ import annotations

import threading

import pytest
import torch

from cli import main as diffbank
from diffs.basemodel import base_fingerprint, load_base
from serving.engine import Predictor
from tests.api_support import random_artifact
from tests.api_support import world as world  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.services

TEXTS = ["a wonderful, warm film", "dull and far too long", "it was fine, I guess", "wow"]


def _predict(world, task, inputs, **params):
    response = world.client.post(
        f"/v1/tasks/{task}/predict",
        headers=world.headers("alice"),
        params=params,
        json={"inputs": inputs},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _merged_predictions(outdir, inputs, *, pairs=None, max_length=64):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(outdir).eval()
    tokenizer = AutoTokenizer.from_pretrained(outdir)
    encoded = tokenizer(
        inputs, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**encoded).logits


def test_api_predictions_equal_the_exported_merged_model(world, tmp_path):
    world.publish_version("alice", "three-way", seed=101, labels=("a", "b", "c"), density=0.05)
    artifact = tmp_path / "three-way.safetensors"
    artifact.write_bytes(
        world.client.get("/v1/tasks/three-way/diff", headers=world.headers("alice")).content
    )
    assert (
        diffbank(["export", str(artifact), str(tmp_path / "merged"), "--base", str(world.base_dir)])
        == 0
    )
    logits = _merged_predictions(tmp_path / "merged", TEXTS)
    probs = logits.softmax(-1)
    answer = _predict(world, "three-way", TEXTS)
    assert answer["version"] == 1 and answer["task"] == "three-way"
    for prediction, row in zip(answer["predictions"], probs, strict=True):
        assert prediction["label"] == ["a", "b", "c"][int(row.argmax())]
        assert prediction["score"] == pytest.approx(float(row.max()), abs=1e-5)


def test_regression_task_answers_values_equal_to_the_merged_model(world, tmp_path):
    world.publish_version("alice", "rating", seed=102, task_type="regression", labels=())
    artifact = tmp_path / "rating.safetensors"
    artifact.write_bytes(
        world.client.get("/v1/tasks/rating/diff", headers=world.headers("alice")).content
    )
    assert (
        diffbank(["export", str(artifact), str(tmp_path / "merged"), "--base", str(world.base_dir)])
        == 0
    )
    logits = _merged_predictions(tmp_path / "merged", TEXTS)
    answer = _predict(world, "rating", TEXTS)
    assert all(set(p) == {"value"} for p in answer["predictions"])
    assert [p["value"] for p in answer["predictions"]] == pytest.approx(
        logits[:, 0].tolist(), abs=1e-5
    )


def test_pair_task_takes_pairs(world, tmp_path):
    world.publish_version(
        "alice", "entail", seed=103, task_type="pair-classification", labels=("no", "yes")
    )
    pairs = [["it rains", "the street is wet"], ["it is sunny", "it rains"]]
    answer = _predict(world, "entail", pairs)
    artifact = tmp_path / "entail.safetensors"
    artifact.write_bytes(
        world.client.get("/v1/tasks/entail/diff", headers=world.headers("alice")).content
    )
    assert (
        diffbank(["export", str(artifact), str(tmp_path / "m"), "--base", str(world.base_dir)]) == 0
    )
    probs = _merged_predictions(
        tmp_path / "m", [p[0] for p in pairs], pairs=[p[1] for p in pairs]
    ).softmax(-1)
    assert [p["label"] for p in answer["predictions"]] == [
        ["no", "yes"][int(r.argmax())] for r in probs
    ]


def test_hot_swap_between_tasks_returns_the_base_bit_exact_between_requests(world):
    world.publish_version("alice", "swap-a", seed=104)
    world.publish_version("alice", "swap-b", seed=105, labels=("x", "y", "z"))
    predictor: Predictor = world.app.state.predictor
    base = load_base(str(world.base_dir))
    first_a = _predict(world, "swap-a", TEXTS)
    served = predictor.base(str(world.base_dir)).model
    head_before = {n: p.clone() for n, p in served.classifier.named_parameters()}
    assert base_fingerprint(served.base_model) == base.fingerprint
    for task in ["swap-b", "swap-a", "swap-b", "swap-a"]:
        answer = _predict(world, task, TEXTS)
        assert base_fingerprint(served.base_model) == base.fingerprint
        if task == "swap-a":
            assert answer == first_a  # the same task answers exactly the same after a swap
        else:
            assert {p["label"] for p in answer["predictions"]} <= {"x", "y", "z"}
    for name, param in served.classifier.named_parameters():
        assert torch.equal(param, head_before[name])


def test_decoded_diffs_are_kept_in_an_lru_of_the_configured_size(tiny_base_dir):
    predictor = Predictor(cache_size=2)
    artifacts = {
        key: random_artifact(
            tiny_base_dir, seed=seed, task_type="classification", labels=("n", "p"), density=0.01
        )
        for key, seed in [("a", 1), ("b", 2), ("c", 3)]
    }
    fetched = []

    def ask(key):
        def fetch():
            fetched.append(key)
            return artifacts[key]

        resident = predictor.resolve(str(tiny_base_dir), key, fetch)
        return predictor.run_batch([predictor.prepare(str(tiny_base_dir), [resident], ["hello"])])

    for key in ["a", "b", "a", "c", "a", "b"]:
        ask(key)
    # a, b fetched; a hit; c evicts b (least recently used); a hit; b fetched again.
    assert fetched == ["a", "b", "c", "b"]
    assert (predictor.cache_hits, predictor.cache_misses) == (2, 4)


def test_concurrent_requests_for_different_tasks_match_sequential_answers(world):
    world.publish_version("alice", "conc-a", seed=106)
    world.publish_version("alice", "conc-b", seed=107)
    expected = {t: _predict(world, t, TEXTS) for t in ("conc-a", "conc-b")}
    results: list[tuple[str, dict]] = []
    errors: list[BaseException] = []

    def worker(task):
        try:
            for _ in range(3):
                results.append((task, _predict(world, task, TEXTS)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("conc-a", "conc-b") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 12
    assert all(answer == expected[task] for task, answer in results)


def test_an_artifact_for_another_base_cannot_be_served(tiny_base_dir, tmp_path):
    from diffs.types import ArtifactError
    from tests.fixtures.models import make_tiny_bert

    other = make_tiny_bert(tmp_path / "other", seed=9)
    data = random_artifact(
        other, seed=1, task_type="classification", labels=("n", "p"), density=0.01
    )
    with pytest.raises(ArtifactError, match="wrong base"):
        Predictor().predict_artifact(data, ["hello"], base=str(tiny_base_dir))


def test_a_diff_served_by_apply_and_revert_is_charged_what_its_apply_plan_holds(tiny_base_dir):
    from diffs.build import make_meta_consistent
    from diffs.types import ArtifactMeta, SparseDiff
    from diffs.write import dumps_artifact

    base = load_base(str(tiny_base_dir))
    name = "embeddings.word_embeddings.weight"  # factors on an embedding: not corrected per row
    m, n = base.shapes[name]
    generator = torch.Generator().manual_seed(5)
    factors = {
        name: (torch.randn(m, 1, generator=generator), torch.randn(n, 1, generator=generator))
    }
    hidden = base.config.hidden_size
    head = {"classifier.weight": torch.randn(2, hidden), "classifier.bias": torch.zeros(2)}
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type="classification",
        label_names=["n", "p"],
        value_dtype="float32",
    )
    data = dumps_artifact(
        make_meta_consistent(SparseDiff({}, {}, {name: (m, n)}, head, meta, factors))
    )
    predictor = Predictor()
    key = str(tiny_base_dir)
    resident = predictor.resolve(key, "embedding-factors", lambda: data)
    assert resident.decoded is None and resident.diff is not None
    predictor.run_batch([predictor.prepare(key, [resident], ["hi"])])
    (plan,) = resident.diff.apply_plans.values()  # built by the prediction: U Vᵀ and saved values
    held = sum(t.numel() * t.element_size() for t in (*plan.deltas, *plan.buffers))
    assert held >= 2 * m * n * 4
    stored = sum(u.numel() * 4 + v.numel() * 4 for u, v in resident.diff.factors.values())
    assert resident.nbytes >= held + stored + resident.head.nbytes
