"""Mixed-task forward: each row of one batch over many tasks equals its task's merged model;
rows never see another task's diff or head; the base stays pristine; the decoded-diff cache is
bounded by bytes and decodes a missing diff once."""

from __future__ import annotations

import threading

import pytest
import torch

from diffs.apply import build_task_model
from diffs.basemodel import base_fingerprint, load_base
from diffs.read import loads_artifact
from serving.engine import PredictionInputError, Predictor
from tests.api_support import dense_artifact, random_artifact, random_deltas
from tests.fixtures.models import ENCODER_FAMILIES, make_tiny_family_base

TEXTS = ["a wonderful, warm film", "dull and far too long for anyone", "wow"]
PAIRS = [["it rains", "the street is wet"], ["it is sunny today", "it rains"]]
# fp32: x·Wᵀ + x·Δᵀ rounds differently from x·(W+Δ)ᵀ, so logits agree to 1e-5 absolute
# plus 1e-5 relative (torch.allclose's rule), not bit for bit.
TOLERANCE = 1e-5


def _merged_logits(base, data: bytes, inputs) -> torch.Tensor:
    """Logits of the task's standalone merged model (base + diff, its head) on `inputs` alone."""
    diff = loads_artifact(data)
    model = build_task_model(base, diff)
    if inputs and not isinstance(inputs[0], str):
        texts, pairs = [p[0] for p in inputs], [p[1] for p in inputs]
    else:
        texts, pairs = list(inputs), None
    encoded = base.encode(texts, pairs, max_length=diff.meta.max_length)
    with torch.no_grad():
        return model(**encoded).logits


def _assert_rows_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.fixture(scope="module")
def tasks(tiny_base_dir):
    """Artifacts of all three task types on the tiny base, plus a consolidated pair."""
    base = load_base(str(tiny_base_dir))
    made = {
        "sentiment": random_artifact(
            tiny_base_dir, seed=1, task_type="classification", labels=("n", "p"), density=0.05
        ),
        "topic": random_artifact(
            tiny_base_dir, seed=2, task_type="classification", labels=("a", "b", "c"), density=0.05
        ),
        "entail": random_artifact(
            tiny_base_dir,
            seed=3,
            task_type="pair-classification",
            labels=("no", "yes"),
            density=0.05,
        ),
        "rating": random_artifact(
            tiny_base_dir, seed=4, task_type="regression", labels=(), density=0.05
        ),
    }
    shared = random_deltas(base, seed=10, density=0.05)
    made["shared"] = dense_artifact(base, shared, {})
    hidden = base.config.hidden_size
    for name, seed in (("group-a", 11), ("group-b", 12)):
        residual = random_deltas(base, seed=seed, density=0.02)
        generator = torch.Generator().manual_seed(seed)
        head = {
            "classifier.weight": torch.randn(2, hidden, generator=generator),
            "classifier.bias": torch.randn(2, generator=generator),
        }
        made[name] = dense_artifact(base, residual, head)
        made[f"{name}-composed"] = dense_artifact(
            base, {n: shared[n] + residual[n] for n in residual}, head
        )
    return made


def _resident(predictor, base_dir, tasks, name):
    return predictor.resolve(str(base_dir), name, lambda: tasks[name])


def test_one_batch_over_every_task_type_equals_each_merged_model_row_by_row(
    tiny_base_dir, tasks, one_torch_thread
):
    base = load_base(str(tiny_base_dir))
    predictor = Predictor()
    shared = _resident(predictor, tiny_base_dir, tasks, "shared")
    plan = [  # (diffs, inputs, artifact of the merged reference)
        (["sentiment"], TEXTS, "sentiment"),
        (["entail"], PAIRS, "entail"),
        (["rating"], TEXTS[:2], "rating"),
        (["topic"], TEXTS[1:], "topic"),
        (["group-a"], TEXTS, "group-a-composed"),
        (["sentiment"], ["another request of the same task"], "sentiment"),
        (["group-b"], TEXTS[:1], "group-b-composed"),
    ]
    requests = []
    for names, inputs, _ in plan:
        diffs = [_resident(predictor, tiny_base_dir, tasks, n) for n in names]
        if names[0].startswith("group"):
            diffs = [shared, *diffs]
        requests.append(predictor.prepare(str(tiny_base_dir), diffs, inputs))
    logits = predictor.batch_logits(requests)
    for (_, inputs, reference), got in zip(plan, logits, strict=True):
        _assert_rows_equal(got, _merged_logits(base, tasks[reference], inputs))
    served = predictor.base(str(tiny_base_dir)).model.base_model
    assert base_fingerprint(served) == base.fingerprint


def test_a_row_never_sees_another_tasks_diff_or_head(tiny_base_dir, tasks, one_torch_thread):
    predictor = Predictor()
    alone = {}
    for name in ("sentiment", "topic"):
        request = predictor.prepare(
            str(tiny_base_dir), [_resident(predictor, tiny_base_dir, tasks, name)], TEXTS
        )
        alone[name] = predictor.batch_logits([request])[0]
    mixed = predictor.batch_logits(
        [
            predictor.prepare(
                str(tiny_base_dir), [_resident(predictor, tiny_base_dir, tasks, name)], TEXTS
            )
            for name in ("topic", "sentiment", "topic")
        ]
    )
    assert mixed[0].shape == (3, 3) and mixed[1].shape == (3, 2)  # each row got its own head
    _assert_rows_equal(mixed[0], alone["topic"])
    _assert_rows_equal(mixed[1], alone["sentiment"])
    _assert_rows_equal(mixed[2], alone["topic"])
    assert float((alone["topic"][:, :2] - alone["sentiment"]).abs().max()) > 1e-2


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_every_encoder_family_serves_mixed_batches_equal_to_merged_models(
    family, tmp_path, one_torch_thread
):
    base_dir = make_tiny_family_base(family, tmp_path / family)
    base = load_base(str(base_dir))
    artifacts = {
        task_type: random_artifact(
            base_dir, seed=seed, task_type=task_type, labels=labels, density=0.05
        )
        for seed, (task_type, labels) in enumerate(
            [("classification", ("n", "p")), ("pair-classification", ("a", "b", "c"))], start=1
        )
    }
    predictor = Predictor()
    inputs = {"classification": TEXTS, "pair-classification": PAIRS}
    requests = [
        predictor.prepare(
            str(base_dir),
            [predictor.resolve(str(base_dir), kind, lambda kind=kind: artifacts[kind])],
            inputs[kind],
        )
        for kind in artifacts
    ]
    assert all(r.diffs[0].decoded is not None for r in requests)  # served mixed, not applied
    for kind, got in zip(artifacts, predictor.batch_logits(requests), strict=True):
        _assert_rows_equal(got, _merged_logits(base, artifacts[kind], inputs[kind]))


def test_minilm_mixed_batch_equals_merged_models(one_torch_thread):
    base = load_base("all-MiniLM-L6-v2")
    path = base.path
    artifacts = [
        random_artifact(
            path, seed=seed, task_type="classification", labels=("n", "p"), density=0.005
        )
        for seed in (1, 2)
    ]
    predictor = Predictor()
    requests = [
        predictor.prepare(path, [predictor.resolve(path, f"m{i}", lambda a=a: a)], TEXTS[i:])
        for i, a in enumerate(artifacts)
    ]
    for i, got in enumerate(predictor.batch_logits(requests)):
        _assert_rows_equal(got, _merged_logits(base, artifacts[i], TEXTS[i:]))


def test_a_request_without_a_head_is_refused(tiny_base_dir, tasks):
    predictor = Predictor()
    request = predictor.prepare(
        str(tiny_base_dir), [_resident(predictor, tiny_base_dir, tasks, "shared")], TEXTS
    )
    with pytest.raises(PredictionInputError, match="no task head"):
        predictor.batch_logits([request])


def test_the_cache_is_bounded_by_bytes_and_evicts_least_recently_used(tiny_base_dir, tasks):
    probe = Predictor()
    one = _resident(probe, tiny_base_dir, tasks, "sentiment").nbytes
    predictor = Predictor(cache_bytes=int(one * 2.5))
    for name in ("sentiment", "topic", "sentiment", "rating", "entail"):
        _resident(predictor, tiny_base_dir, tasks, name)
        assert predictor.resident_bytes <= predictor.cache_bytes
    stats = predictor.cache_stats()
    assert stats["hits"] == 1 and stats["misses"] == 4
    assert stats["evictions"] == 2 and stats["entries"] == 2
    assert stats["bytes"] == predictor.resident_bytes > 0


def test_a_miss_is_decoded_once_for_all_waiters_and_does_not_stall_resident_tasks(
    tiny_base_dir, tasks
):
    predictor = Predictor()
    resident = _resident(predictor, tiny_base_dir, tasks, "sentiment")
    release, fetching = threading.Event(), threading.Event()
    fetches = []

    def slow_fetch():
        fetches.append(1)
        fetching.set()
        assert release.wait(30)
        return tasks["topic"]

    got = []
    waiters = [
        threading.Thread(
            target=lambda: got.append(predictor.resolve(str(tiny_base_dir), "topic", slow_fetch))
        )
        for _ in range(4)
    ]
    for thread in waiters:
        thread.start()
    assert fetching.wait(30)
    # While the miss is being fetched, the resident task still answers.
    answer = predictor.run_batch([predictor.prepare(str(tiny_base_dir), [resident], TEXTS)])
    assert len(answer[0]) == len(TEXTS)
    release.set()
    for thread in waiters:
        thread.join()
    assert len(fetches) == 1
    assert len(got) == 4 and all(r is got[0] for r in got)
    assert predictor.cache_stats()["misses"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_mixed_forward_runs_on_cuda_and_equals_merged_models(tiny_base_dir, tasks):
    base = load_base(str(tiny_base_dir))
    predictor = Predictor(device="cuda")
    plan = [("sentiment", TEXTS), ("entail", PAIRS), ("rating", TEXTS[:2])]
    requests = [
        predictor.prepare(
            str(tiny_base_dir), [_resident(predictor, tiny_base_dir, tasks, name)], inputs
        )
        for name, inputs in plan
    ]
    for (name, inputs), got in zip(plan, predictor.batch_logits(requests), strict=True):
        _assert_rows_equal(got, _merged_logits(base, tasks[name], inputs))
