"""Loading, building from and fingerprinting the shared base encoder."""

from __future__ import annotations

import torch

from diffs.basemodel import base_fingerprint, build_model, load_base, resolve_base_path
from tests.fixtures.models import make_tiny_bert


def test_load_base_reads_a_local_directory_once_and_names_it_after_the_directory(tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    assert base.name == tiny_base_dir.name
    assert base.path == resolve_base_path(str(tiny_base_dir))
    assert base.n_params == sum(p.numel() for p in base.encoder.parameters())
    assert base.fingerprint == base_fingerprint(base.encoder)
    assert base.tokenizer("hello world")["input_ids"][0] == base.tokenizer.cls_token_id
    assert load_base(str(tiny_base_dir)) is base
    assert base.shapes["embeddings.word_embeddings.weight"] == (base.config.vocab_size, 32)


def test_bundled_minilm_loads_by_name_without_a_network():
    base = load_base("all-MiniLM-L6-v2")
    assert base.name == "all-MiniLM-L6-v2"
    assert base.n_params == 22_713_216
    assert len(base.fingerprint) == 64


def test_build_model_copies_the_base_weights_and_sets_labels(tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    model = build_model(base, task_type="classification", num_labels=3, label_names=["a", "b", "c"])
    assert base_fingerprint(model.base_model) == base.fingerprint
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.config.num_labels == 3
    with torch.no_grad():
        model.base_model.embeddings.word_embeddings.weight[0, 0] += 1.0
    assert base_fingerprint(base.encoder) == base.fingerprint  # the base was not touched


def test_build_model_for_regression_has_one_output(tiny_base_dir):
    model = build_model(load_base(str(tiny_base_dir)), task_type="regression", num_labels=1)
    assert model.config.problem_type == "regression"
    assert model.classifier.out_features == 1


def test_fingerprint_changes_with_a_single_bit_and_with_the_seed(tiny_base_dir, tmp_path):
    base = load_base(str(tiny_base_dir))
    model = build_model(base, task_type="classification", num_labels=2)
    weight = model.base_model.encoder.layer[1].output.dense.weight
    with torch.no_grad():
        bits = weight.view(-1)[:1].view(torch.int32)
        bits ^= 1  # flip the lowest mantissa bit of one entry
    assert base_fingerprint(model.base_model) != base.fingerprint
    other = load_base(str(make_tiny_bert(tmp_path / "other-seed", seed=1)))
    assert other.fingerprint != base.fingerprint
