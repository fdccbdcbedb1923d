"""Serving consolidated tasks: the group's shared diff is decoded once and stays resident beside
each task's residual, predictions equal the composed diff's, and the base stays pristine."""

from __future__ import annotations

import torch

from diffs.basemodel import load_base
from diffs.build import diff_from_dense
from diffs.types import ArtifactMeta
from diffs.write import dumps_artifact
from serving.engine import Predictor


def _sparse(base, *, seed: int, density: float, head: bool):
    generator = torch.Generator().manual_seed(seed)
    deltas = {
        name: torch.randn(p.shape, generator=generator)
        * 0.3
        * (torch.rand(p.shape, generator=generator) < density)
        for name, p in base.encoder.named_parameters()
    }
    hidden = base.config.hidden_size
    heads = (
        {
            "classifier.weight": torch.randn(2, hidden, generator=generator),
            "classifier.bias": torch.randn(2, generator=generator),
        }
        if head
        else {}
    )
    return deltas, heads


def _artifact(base, deltas, head) -> bytes:
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type="classification",
        label_names=["neg", "pos"],
        max_length=16,
    )
    return dumps_artifact(diff_from_dense(deltas, head, meta, "float32"))


def test_factored_serving_matches_the_composed_diff_and_keeps_the_shared_part_resident(
    tiny_base_dir,
):
    base = load_base(str(tiny_base_dir))
    shared_deltas, _ = _sparse(base, seed=0, density=0.05, head=False)
    shared = _artifact(base, shared_deltas, {})
    residuals, composed = {}, {}
    for task, seed in (("a", 1), ("b", 2)):
        deltas, head = _sparse(base, seed=seed, density=0.02, head=True)
        residuals[task] = _artifact(base, deltas, head)
        composed[task] = _artifact(base, {n: shared_deltas[n] + deltas[n] for n in deltas}, head)
    predictor = Predictor(cache_size=8)
    texts = ["a fine day", "a terrible night", "nothing much"]
    pristine = {
        n: p.detach().clone()
        for n, p in predictor.base(str(tiny_base_dir)).model.base_model.named_parameters()
    }

    for task in ("a", "b", "a"):
        parts = [
            predictor.resolve(str(tiny_base_dir), "shared", lambda: shared),
            predictor.resolve(
                str(tiny_base_dir), f"residual-{task}", lambda task=task: residuals[task]
            ),
        ]
        (factored,) = predictor.run_batch([predictor.prepare(str(tiny_base_dir), parts, texts)])
        merged = predictor.predict_artifact(composed[task], texts, base=str(tiny_base_dir))
        assert [p["label"] for p in factored] == [p["label"] for p in merged]
        for f, m in zip(factored, merged, strict=True):
            assert abs(f["score"] - m["score"]) < 1e-5
        # neither the factored nor the library-mode prediction left anything in the base
        for name, param in predictor.base(str(tiny_base_dir)).model.base_model.named_parameters():
            assert torch.equal(param, pristine[name]), name
    # the shared diff was decoded once and reused from the cache
    assert predictor.cache_misses == 3
