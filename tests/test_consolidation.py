"""Consolidation, the algorithm: budgets met exactly, composed = shared + residual, resume, refusals.

Real parts: the tiny random BERT, the trainer's gates/projection/evaluate, the artifact format.
Current versions are random sparse diffs with random heads (the algorithm only needs a diff).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from registry.apply import apply_diff
from registry.artifact import ArtifactMeta, diff_from_dense, dumps_artifact, loads_artifact
from registry.basemodel import load_base
from worker.consolidation import lowrank
from worker.consolidation.artifacts import evaluate_diff
from worker.consolidation.budget import knapsack_topk, project_to_budget
from worker.consolidation.config import (
    ConsolidationConfig,
    ConsolidationError,
    ConsolidationTask,
    accept,
)
from worker.consolidation.fit import consolidate, task_sampling_probabilities
from worker.consolidation.state import SHARED, GatedDiffSet
from worker.data import load_task_data
from worker.kit.progress import TrainingCancelled

WORDS = {"a": ("bad", "good"), "b": ("awful", "great"), "c": ("sad", "happy")}
SIZES = {"a": 40, "b": 40, "c": 16}  # task c is the low-resource one


def _task_data(root: Path, name: str, rows: int):
    rng = random.Random(name)
    directory = root / name
    directory.mkdir()
    lines = []
    for _ in range(rows):
        label = rng.randrange(2)
        lines.append(
            json.dumps(
                {
                    "text": f"{WORDS[name][label]} item {rng.randrange(50)}",
                    "label": ["neg", "pos"][label],
                }
            )
        )
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return load_task_data(directory, validation_fraction=0.25)


def _random_current(base, data, *, seed: int, entries: int):
    generator = torch.Generator().manual_seed(seed)
    flat_sizes = {n: p.numel() for n, p in base.encoder.named_parameters()}
    deltas = {}
    for name, param in base.encoder.named_parameters():
        count = max(1, entries * flat_sizes[name] // base.n_params)
        dense = torch.zeros(param.numel())
        dense[torch.randperm(param.numel(), generator=generator)[:count]] = (
            torch.randn(count, generator=generator) * 0.05
        )
        deltas[name] = dense.view(param.shape)
    hidden = base.config.hidden_size
    head = {
        "classifier.weight": torch.randn(2, hidden, generator=generator) * 0.1,
        "classifier.bias": torch.zeros(2),
    }
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type=data.task_type,
        label_names=list(data.label_names),
        max_length=16,
    )
    return diff_from_dense(deltas, head, meta, "float32")


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(str(tiny_base_dir))


@pytest.fixture(scope="module")
def tasks(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("consolidation-tasks")
    out = []
    for i, name in enumerate(SIZES):
        data = _task_data(root, name, SIZES[name])
        out.append(ConsolidationTask(name, data, _random_current(base, data, seed=i, entries=1500)))
    return out


def _config(**overrides) -> ConsolidationConfig:
    values = dict(
        budget=2000,
        epochs=0.5,
        fix_epochs=0.5,
        batch_size=16,
        max_length=16,
        value_dtype="float32",
        rank=2,
        device="cpu",
        lr=1e-3,
    )
    values.update(overrides)
    return ConsolidationConfig(**values)


@pytest.fixture(scope="module")
def elementwise_result(tasks, base):
    return consolidate(tasks, _config(strategy="elementwise"), base=base, run_id=7)


@pytest.fixture(scope="module")
def rank_result(tasks, base):
    return consolidate(tasks, _config(strategy="rank", budget=3000), base=base, run_id=8)


def test_elementwise_budget_is_met_exactly_with_the_shared_part_counted_once(elementwise_result):
    result = elementwise_result
    assert result.total_nnz == 2000
    assert result.shared_nnz + sum(t.nnz for t in result.tasks) == 2000
    # element-wise: stored entries are exactly the artifacts' entries
    assert result.shared.nnz == result.shared_nnz
    for outcome in result.tasks:
        assert outcome.residual.nnz == outcome.nnz
        # the composed diff holds the union of shared and residual positions
        assert max(outcome.nnz, result.shared_nnz) <= outcome.composed.nnz
        assert outcome.composed.nnz <= outcome.nnz + result.shared_nnz


def test_rank_budget_counts_factor_entries_and_is_met_exactly(rank_result, base):
    result = rank_result
    assert result.total_nnz == 3000
    extra = [t.residual.meta.extra["consolidation"] for t in result.tasks]
    assert sum(e["stored_entries"] for e in extra) + result.shared_nnz == 3000
    # a kept component of an m x n matrix is stored as m + n factor entries, its product dense
    shapes = base.shapes
    for outcome in result.tasks:
        factored = [n for n in outcome.residual.indices if lowrank.is_factored(n, shapes[n])]
        for name in factored:
            assert outcome.residual.indices[name].numel() == shapes[name][0] * shapes[name][1]


@pytest.mark.parametrize("which", ["elementwise", "rank"])
def test_composed_diff_equals_shared_then_residual_applied_in_turn(
    which, elementwise_result, rank_result, base
):
    result = elementwise_result if which == "elementwise" else rank_result
    for outcome in result.tasks:
        in_turn = copy.deepcopy(base.encoder)
        apply_diff(in_turn, result.shared)
        apply_diff(in_turn, outcome.residual)
        composed = copy.deepcopy(base.encoder)
        apply_diff(composed, outcome.composed)
        for (name, a), (_, b) in zip(
            in_turn.named_parameters(), composed.named_parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_artifacts_round_trip_with_lineage_and_config(elementwise_result, base):
    outcome = elementwise_result.tasks[0]
    loaded = loads_artifact(
        dumps_artifact(outcome.composed),
        expected_fingerprint=base.fingerprint,
        base_shapes=base.shapes,
    )
    lineage = loaded.meta.extra["consolidation"]
    assert lineage["run_id"] == 7 and lineage["role"] == "composed" and lineage["task"] == "a"
    assert loaded.meta.config["budget"] == 2000 and loaded.meta.config["strategy"] == "elementwise"
    assert set(loaded.head) == {"classifier.weight", "classifier.bias"}
    shared = loads_artifact(dumps_artifact(elementwise_result.shared))
    assert shared.meta.extra["consolidation"]["role"] == "shared" and not shared.head


def test_consolidated_tasks_are_evaluated_on_their_own_validation_split(
    elementwise_result, tasks, base
):
    for task, outcome in zip(tasks, elementwise_result.tasks, strict=True):
        metrics = evaluate_diff(outcome.composed, task.data, base=base, config=_config())
        assert metrics["metric_name"] == "accuracy" and 0.0 <= metrics["metric"] <= 1.0


def test_projection_keeps_exactly_the_budget_over_shared_and_residuals_with_deterministic_ties():
    def uniform_set(value: float) -> GatedDiffSet:
        s = GatedDiffSet()
        s.w["x"] = torch.full((4, 5), value)
        s.alpha["x"] = torch.full((4, 5), 5.0)
        return s

    sets = {SHARED: uniform_set(1.0), "t1": uniform_set(1.0), "t2": uniform_set(0.5)}
    kept = project_to_budget(sets, 27)
    assert kept == 27
    assert int(sets[SHARED].mask["x"].sum()) + int(sets["t1"].mask["x"].sum()) == 27
    assert int(sets["t2"].mask["x"].sum()) == 0
    # ties at equal magnitude go to the earlier set in the fixed order (shared first)
    assert bool(sets[SHARED].mask["x"].all())
    # values outside the mask are zero after projection
    assert bool((sets["t1"].w["x"][~sets["t1"].mask["x"]] == 0).all())


def test_balanced_projection_does_not_starve_a_task_whose_values_are_small():
    def set_of(values: torch.Tensor) -> GatedDiffSet:
        s = GatedDiffSet()
        s.w["x"] = values.clone()
        s.alpha["x"] = torch.full(values.shape, 5.0)
        return s

    ramp = torch.linspace(0.1, 2.0, 20).view(4, 5)
    plain = {"big": set_of(ramp), "small": set_of(ramp * 0.01)}
    balanced = {"big": set_of(ramp), "small": set_of(ramp * 0.01)}
    assert project_to_budget(plain, 20) == 20
    assert int(plain["small"].mask["x"].sum()) == 0  # global magnitudes: all go to "big"
    assert project_to_budget(balanced, 20, balance_roles=True) == 20
    assert int(balanced["big"].mask["x"].sum()) == int(balanced["small"].mask["x"].sum()) == 10


def test_knapsack_fills_the_budget_exactly_with_cost_one_items():
    scores = torch.tensor([9.0, 8.0, 7.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    costs = torch.tensor([10, 1, 10, 1, 1, 1, 1, 1])
    keep = knapsack_topk(scores, costs, 15)
    assert int(costs[keep].sum()) == 15
    assert keep.tolist() == [True, True, False, True, True, True, True, False]


def test_knapsack_never_exceeds_the_budget_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        scores = torch.rand(n, generator=generator)
        costs = torch.randint(1, 12, (n,), generator=generator)
        budget = int(torch.randint(1, 60, (1,), generator=generator))
        keep = knapsack_topk(scores, costs, budget)
        used = int(costs[keep].sum())
        assert used <= budget
        ones_left = int(((costs == 1) & ~keep).sum())
        assert used == budget or ones_left == 0


def test_config_refuses_unknown_keys_and_impossible_values_by_name():
    with pytest.raises(ConsolidationError, match="bogus") as caught:
        ConsolidationConfig.from_dict({"bogus": 1})
    assert caught.value.field == "bogus"
    with pytest.raises(ConsolidationError) as caught:
        ConsolidationConfig(rank=0)
    assert caught.value.field == "rank"
    config = ConsolidationConfig(budget=5, rank=2)
    assert ConsolidationConfig.from_json(config.to_json()) == config


def test_temperature_sampling_upsamples_small_tasks():
    p = task_sampling_probabilities([900, 100], temperature=2.0)
    assert p[0] == pytest.approx(30 / 40) and p[1] == pytest.approx(10 / 40)
    assert task_sampling_probabilities([900, 100], temperature=1.0) == pytest.approx([0.9, 0.1])


def test_acceptance_uses_points_of_the_primary_metric():
    assert accept(0.900, 0.896, 0.5)
    assert not accept(0.900, 0.890, 0.5)
    assert accept(0.80, 0.95, 0.0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"budget": 0}, "budget"), ({"budget": 10**9}, "budget"), ({"strategy": "magic"}, "strategy")],
)
def test_invalid_runs_are_refused_before_any_work(tasks, base, overrides, field):
    with pytest.raises(ConsolidationError) as caught:
        consolidate(tasks, _config(**overrides), base=base)
    assert caught.value.field == field


def test_a_task_on_another_base_is_refused(tasks, base):
    other = copy.deepcopy(tasks[0].current)
    other.meta.base_fingerprint = "0" * 64
    with pytest.raises(ConsolidationError) as caught:
        consolidate([tasks[1], ConsolidationTask("x", tasks[0].data, other)], _config(), base=base)
    assert caught.value.field == "tasks"


class MemoryCheckpoint:
    def __init__(self) -> None:
        self.data: bytes | None = None

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        self.data = data


def test_an_interrupted_run_resumes_to_the_same_result(tasks, base, elementwise_result):
    config = _config(strategy="elementwise", checkpoint_every=2)
    checkpoint = MemoryCheckpoint()
    steps = []

    def stop_after_four() -> bool:
        return len(steps) >= 4

    with pytest.raises(TrainingCancelled):
        consolidate(
            tasks,
            config,
            base=base,
            run_id=7,
            checkpoint=checkpoint,
            progress=steps.append,
            should_stop=stop_after_four,
        )
    assert checkpoint.data is not None
    assert steps[-1].phase == "fix" and steps[-1].step < steps[-1].total_steps  # past projection
    resumed = consolidate(tasks, config, base=base, run_id=7, checkpoint=checkpoint)
    assert resumed.total_nnz == elementwise_result.total_nnz
    for a, b in zip(resumed.tasks, elementwise_result.tasks, strict=True):
        assert a.composed.indices.keys() == b.composed.indices.keys()
        for name in a.composed.indices:
            assert torch.equal(a.composed.indices[name], b.composed.indices[name])
            torch.testing.assert_close(a.composed.values[name], b.composed.values[name])
