"""Training-free merge strategies: task arithmetic, TIES and DARE on sparse diffs, under the budget.

Real parts: the tiny random BERT, the artifact format, the consolidation runner over a migrated
SQLite registry and a file store. Current versions are hand-built sparse diffs whose merged
values are worked out by hand, or checked against a dense (stacked) reference.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffs.basemodel import load_base
from diffs.build import diff_from_dense, make_meta_consistent
from diffs.types import ArtifactMeta, SparseDiff
from diffs.write import dumps_artifact
from registry import catalog
from registry.db import get_session_factory
from registry.publish import publish_version
from registry.stores import open_store
from settings import Settings
from tests.fixtures.services import seed_training_job
from worker.consolidation.config import ConsolidationConfig, ConsolidationError, ConsolidationTask
from worker.consolidation.fit import consolidate
from worker.consolidation.job import run_consolidation
from worker.consolidation.merge import largest, merge_consolidate, merge_entries
from worker.data import load_task_data
from worker.diffprune.projection import densify
from worker.lifecycle import SUCCEEDED, load_job_data

QUERY = "encoder.layer.0.attention.self.query.weight"  # 32 x 32 in the tiny base
BIAS = "embeddings.LayerNorm.bias"  # 32
SHAPES = {QUERY: (32, 32), BIAS: (32,)}
MERGES = ("ties", "dare", "task_arithmetic")


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(str(tiny_base_dir))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("merge-data") / "train.jsonl"
    rows = [{"text": "good item", "label": "a"}, {"text": "bad item", "label": "b"}] * 16
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_task_data(path, validation_fraction=0.25)


def _meta(base, data) -> ArtifactMeta:
    return ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type=data.task_type,
        label_names=list(data.label_names),
        max_length=16,
    )


def _diff(meta: ArtifactMeta, entries: dict[str, dict[int, float]], *, seed: int = 0) -> SparseDiff:
    """A float32 diff holding `entries` (tensor -> flat index -> value) and a random head."""
    dense = {}
    for name, values in entries.items():
        flat = torch.zeros(math.prod(SHAPES[name]))
        for index, value in values.items():
            flat[index] = value
        dense[name] = flat.view(SHAPES[name])
    generator = torch.Generator().manual_seed(seed)
    head = {
        "classifier.weight": torch.randn(len(meta.label_names), 32, generator=generator),
        "classifier.bias": torch.randn(len(meta.label_names), generator=generator),
    }
    return diff_from_dense(dense, head, meta, "float32")


def _config(strategy: str, **overrides) -> ConsolidationConfig:
    values = dict(strategy=strategy, budget=10_000, value_dtype="float32", device="cpu")
    values.update(overrides)
    return ConsolidationConfig(**values)


def _values(diff: SparseDiff) -> dict[str, dict[int, float]]:
    """A diff's entries as tensor -> flat index -> value."""
    return {
        name: dict(zip(diff.indices[name].tolist(), diff.values[name].tolist(), strict=True))
        for name in diff.indices
    }


@pytest.fixture(scope="module")
def three_tasks(base, data):
    """Three tasks whose diffs overlap and disagree in sign at some positions."""
    meta = _meta(base, data)
    entries = {
        "a": {QUERY: {0: 3.0, 1: -1.0, 2: 0.5, 3: 2.0}, BIAS: {4: 0.25}},
        "b": {QUERY: {0: -1.0, 1: -2.0, 2: 4.0, 5: 0.125}},
        "c": {QUERY: {0: 1.0, 1: 3.0, 3: -0.5}, BIAS: {4: -1.0, 7: 0.5}},
    }
    return [
        ConsolidationTask(name, data, _diff(meta, e, seed=i))
        for i, (name, e) in enumerate(entries.items())
    ]


def test_task_arithmetic_is_lambda_times_the_sum_of_the_diffs(three_tasks, base):
    result = merge_consolidate(three_tasks, _config("task_arithmetic", merge_weight=0.5), base=base)
    # position 1 of QUERY sums to 0 and is not stored
    assert _values(result.shared) == {
        QUERY: {0: 1.5, 2: 2.25, 3: 0.75, 5: 0.0625},
        BIAS: {4: -0.375, 7: 0.25},
    }


def test_ties_elects_the_sign_of_the_sum_and_averages_only_the_agreeing_values(three_tasks, base):
    result = merge_consolidate(three_tasks, _config("ties", ties_density=1.0), base=base)
    assert _values(result.shared) == {
        # 0: 3, -1, 1 -> + -> mean(3, 1); 1: -1, -2, 3 sum to 0 -> + -> 3; 3: 2, -0.5 -> 2
        QUERY: {0: 2.0, 1: 3.0, 2: 2.25, 3: 2.0, 5: 0.125},
        BIAS: {4: -1.0, 7: 0.5},  # 4: 0.25, -1 -> - -> -1
    }


def test_ties_trims_each_task_to_its_largest_magnitudes_before_the_vote(three_tasks, base):
    result = merge_consolidate(
        three_tasks, _config("ties", ties_density=0.4, merge_weight=2.0), base=base
    )
    # kept: a (5 entries -> 2) 3.0@0, 2.0@3; b (4 -> 2) 4.0@2, -2.0@1;
    # c (5 -> 2) 3.0@1 and -1.0@BIAS4 before 1.0@QUERY0 (equal magnitude, BIAS sorts first)
    assert _values(result.shared) == {
        QUERY: {0: 6.0, 1: 6.0, 2: 8.0, 3: 4.0},
        BIAS: {4: -2.0},
    }


def test_dare_is_reproducible_by_seed_and_rescales_the_survivors(three_tasks, base):
    def shared(seed: int) -> dict:
        config = _config("dare", dare_drop=0.5, seed=seed)
        return _values(merge_consolidate(three_tasks, config, base=base).shared)

    assert shared(3) == shared(3)
    assert len({json.dumps(shared(seed), sort_keys=True) for seed in range(8)}) > 1
    # a lone task: every survivor is its value / (1 - p)
    alone = merge_consolidate(three_tasks[:1], _config("dare", dare_drop=0.5, seed=1), base=base)
    original = _values(three_tasks[0].current)
    for name, values in _values(alone.shared).items():
        for index, value in values.items():
            assert value == original[name][index] * 2.0


def test_dare_is_unbiased_in_expectation(base, data):
    values = {QUERY: {i: 0.5 + (i % 7) / 8 for i in range(1000)}}
    tasks = [ConsolidationTask("only", data, _diff(_meta(base, data), values))]
    expected = densify(tasks[0].current.indices, tasks[0].current.values, SHAPES)[QUERY]
    draws = []
    for seed in range(60):
        merged = merge_entries([tasks[0].current], _config("dare", dare_drop=0.75, seed=seed))
        draws.append(densify(*_split(merged), SHAPES)[QUERY])
    mean = torch.stack(draws).mean(dim=0)
    # the total: 60 draws of 1000 entries, standard error about 0.6% of it
    assert float(mean.sum()) == pytest.approx(float(expected.sum()), rel=0.03)
    kept = sum(float((d != 0).sum()) for d in draws) / (60 * 1000)
    assert kept == pytest.approx(0.25, abs=0.02)


def _split(entries):
    return (
        {name: idx for name, (idx, _) in entries.items()},
        {name: v for name, (_, v) in entries.items()},
    )


MERGE_SUPPORT_IS_THE_UNION = {"ties_density": 1.0, "dare_drop": 0.0}


@pytest.mark.parametrize("strategy", MERGES)
@pytest.mark.parametrize("budget", [3, 9, 100])
def test_the_shared_diff_holds_exactly_min_of_budget_and_union_entries(
    three_tasks, base, strategy, budget
):
    result = merge_consolidate(
        three_tasks, _config(strategy, budget=budget, **MERGE_SUPPORT_IS_THE_UNION), base=base
    )
    union = {(n, int(i)) for t in three_tasks for n, idx in t.current.indices.items() for i in idx}
    if strategy != "ties":
        union.discard((QUERY, 1))  # its values sum to zero
    assert result.shared.nnz == result.shared_nnz == min(budget, len(union))
    assert result.shared.meta.nnz == result.shared_nnz
    assert result.total_nnz == result.shared_nnz  # residuals are empty
    assert result.steps == 0 and result.train_seconds >= 0
    merged = merge_consolidate(
        three_tasks, _config(strategy, budget=100, **MERGE_SUPPORT_IS_THE_UNION), base=base
    )
    kept = [abs(v) for values in _values(result.shared).values() for v in values.values()]
    dropped = [
        abs(v)
        for name, values in _values(merged.shared).items()
        for i, v in values.items()
        if i not in _values(result.shared).get(name, {})
    ]
    assert not dropped or min(kept) >= max(dropped)  # the largest magnitudes survive


def test_projection_breaks_equal_magnitudes_by_position(base, data):
    meta = _meta(base, data)
    tasks = [
        ConsolidationTask("a", data, _diff(meta, {QUERY: {9: 1.0, 2: -1.0}, BIAS: {30: 1.0}})),
        ConsolidationTask("b", data, _diff(meta, {QUERY: {5: 1.0}}, seed=1)),
    ]
    result = merge_consolidate(tasks, _config("task_arithmetic", budget=2), base=base)
    # tensors in sorted-name order (BIAS first), then by flat index
    assert _values(result.shared) == {BIAS: {30: 1.0}, QUERY: {2: -1.0}}


@pytest.mark.parametrize("strategy", MERGES)
def test_every_task_keeps_its_head_with_an_empty_residual_and_the_shared_diff(
    three_tasks, base, strategy
):
    result = merge_consolidate(three_tasks, _config(strategy), base=base, run_id=11)
    lineage = result.shared.meta.extra["consolidation"]
    assert lineage["role"] == "shared" and lineage["run_id"] == 11
    assert lineage["strategy"] == strategy and lineage["stored_entries"] == result.shared_nnz
    assert result.shared.head == {}
    for task, outcome in zip(three_tasks, result.tasks, strict=True):
        assert outcome.name == task.name and outcome.nnz == 0
        assert outcome.residual.nnz == 0 and outcome.residual.meta.nnz == 0
        assert _values(outcome.composed) == _values(result.shared)
        for diff in (outcome.residual, outcome.composed):
            assert diff.head.keys() == task.current.head.keys()
            for name, tensor in task.current.head.items():
                assert torch.equal(diff.head[name], tensor)
            assert diff.meta.label_names == task.current.meta.label_names
            extra = diff.meta.extra["consolidation"]
            assert extra["task"] == task.name and extra["budget"] == 10_000
            assert extra["shared_stored_entries"] == result.shared_nnz
        assert outcome.residual.meta.extra["consolidation"]["role"] == "residual"
        assert outcome.composed.meta.extra["consolidation"]["role"] == "composed"
        assert outcome.composed.meta.config["strategy"] == strategy
        assert dumps_artifact(outcome.residual) and dumps_artifact(outcome.composed)


@pytest.mark.parametrize("strategy", MERGES)
def test_a_rank_version_merges_as_its_largest_entries_not_its_whole_matrix(base, data, strategy):
    generator = torch.Generator().manual_seed(3)
    u, v = torch.randn(32, 2, generator=generator), torch.randn(32, 2, generator=generator)
    rank = _diff(_meta(base, data), {BIAS: {4: 0.25}, QUERY: {5: 1.0}})
    rank.factors[QUERY] = (u, v)
    make_meta_consistent(rank)
    product = (u @ v.T).reshape(-1)
    assert int(torch.count_nonzero(product)) == 32 * 32  # U Vᵀ is a whole matrix
    top = torch.topk(product.abs(), 2 * (32 + 32)).indices
    positions = torch.unique(torch.cat([top, torch.tensor([5])]))
    config = _config(strategy, ties_density=1.0, dare_drop=0.0)
    merged = merge_entries([rank], config)
    assert torch.equal(merged[QUERY][0], positions)  # r·(m + n) of U Vᵀ, plus its own entry
    expected = product[positions] + (positions == 5).float()
    torch.testing.assert_close(merged[QUERY][1], expected)
    assert sum(int(idx.numel()) for idx, _ in merged.values()) <= rank.nnz


def test_consolidate_dispatches_merge_strategies_without_training(three_tasks, base):
    config = _config("ties", ties_density=0.4)
    via_fit = consolidate(three_tasks, config, base=base)
    direct = merge_consolidate(three_tasks, config, base=base)
    assert via_fit.steps == 0
    assert _values(via_fit.shared) == _values(direct.shared)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"merge_weight": 0.0}, "merge_weight"),
        ({"merge_weight": float("inf")}, "merge_weight"),
        ({"ties_density": 0.0}, "ties_density"),
        ({"ties_density": 1.5}, "ties_density"),
        ({"dare_drop": 1.0}, "dare_drop"),
        ({"dare_drop": -0.1}, "dare_drop"),
    ],
)
def test_impossible_merge_hyperparameters_are_refused_by_name(overrides, field):
    with pytest.raises(ConsolidationError) as caught:
        _config("ties", **overrides)
    assert caught.value.field == field


def test_a_budget_of_zero_is_refused_before_merging(three_tasks, base):
    with pytest.raises(ConsolidationError) as caught:
        merge_consolidate(three_tasks, _config("ties", budget=0), base=base)
    assert caught.value.field == "budget"


# ---------------------------------------------------------------- properties (dense reference)


def _dense_reference(
    diffs, strategy: str, density: float, weight: float
) -> dict[str, torch.Tensor]:
    """TIES, else the plain sum, over stacked dense tensors (the TIES trim by a sort per task)."""
    stacked = {name: [] for name in SHAPES}
    for diff in diffs:
        order = sorted(
            (
                (name, int(i), float(v))
                for name in sorted(diff.indices)
                for i, v in zip(diff.indices[name], diff.values[name], strict=True)
            ),
            key=lambda e: (-abs(e[2]), e[0], e[1]),
        )
        if strategy == "ties":
            order = order[: math.ceil(density * len(order))]
        dense = {name: torch.zeros(math.prod(shape)) for name, shape in SHAPES.items()}
        for name, i, v in order:
            dense[name][i] = v
        for name in SHAPES:
            stacked[name].append(dense[name])
    out = {}
    for name, tensors in stacked.items():
        stack = torch.stack(tensors)
        if strategy == "ties":
            elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
            agree = stack.sign() == elected
            merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        else:
            merged = stack.sum(0)
        out[name] = merged * weight
    return out


small_diff = st.dictionaries(
    st.sampled_from(sorted(SHAPES)),
    st.dictionaries(
        st.integers(0, 31), st.sampled_from([-2.0, -1.0, -0.5, 0.25, 0.5, 1.0, 3.0]), max_size=12
    ),
)


@settings(max_examples=40, deadline=None)
@given(
    diffs=st.lists(small_diff, min_size=1, max_size=4),
    strategy=st.sampled_from(MERGES),
    density=st.sampled_from([0.3, 0.5, 1.0]),
    budget=st.integers(1, 40),
)
def test_sparse_merge_matches_the_dense_reference_and_fits_the_budget(
    diffs, strategy, density, budget
):
    meta = ArtifactMeta(
        base_name="b",
        base_fingerprint="f",
        n_params=10_000,
        task_type="classification",
        label_names=["a", "b"],
    )
    sparse = [_diff(meta, d) for d in diffs]
    # dare with nothing dropped is task arithmetic
    config = _config(strategy, ties_density=density, dare_drop=0.0, merge_weight=0.5)
    merged = merge_entries(sparse, config)
    dense = densify(*_split(merged), SHAPES)
    reference = _dense_reference(sparse, strategy, density, 0.5)
    for name in SHAPES:
        torch.testing.assert_close(dense[name].flatten(), reference[name])
    support = sum(int(idx.numel()) for idx, _ in merged.values())
    assert support == sum(int((t != 0).sum()) for t in reference.values())
    assert sum(int(i.numel()) for i, _ in largest(merged, budget).values()) == min(budget, support)


# ---------------------------------------------------------------- through the runner


@pytest.fixture(scope="module")
def runner_world(tmp_path_factory, tiny_base_dir):
    """Two published tasks of tenant acme on the tiny base, each with a random sparse diff."""
    root = tmp_path_factory.mktemp("merge-runner")
    config = Settings(
        data_dir=root / "data",
        base_model=str(tiny_base_dir),
        checkpoint_every_steps=2,
        job_progress_interval_s=0.0,
        job_cancel_poll_s=0.0,
        job_heartbeat_interval_s=0.2,
        worker_device="cpu",
    )
    base = load_base(str(tiny_base_dir))
    sessions = get_session_factory(config)
    store = open_store(config.store_url, config)
    names = ("reviews", "fewshot")
    for i, name in enumerate(names):
        path = root / f"{name}.jsonl"
        rows = [
            {"text": f"{w} {w}", "label": lab} for lab, w in (("pos", "great"), ("neg", "awful"))
        ]
        path.write_text("\n".join(json.dumps(r) for r in rows * (12 - 4 * i)) + "\n")
        job_id = seed_training_job(config, path, task=name)
        with sessions() as session:
            job = catalog.load_job(session, job_id=job_id)
            task_data = load_job_data(session, store, job, config, seed=0)
            base_row = catalog.register_base_model(
                session,
                name=base.name,
                source=str(tiny_base_dir),
                fingerprint=base.fingerprint,
                n_params=base.n_params,
            )
            task_row = catalog.get_or_create_task(
                session,
                tenant_id=job.tenant_id,
                name=name,
                base_model_id=base_row.id,
                task_type=task_data.task_type,
                label_names=list(task_data.label_names),
            )
            generator = torch.Generator().manual_seed(i)
            deltas = {
                n: (torch.rand(p.shape, generator=generator) < 0.01) * torch.randn(p.shape) * 1e-3
                for n, p in base.encoder.named_parameters()
            }
            head = {
                "classifier.weight": torch.randn(2, 32, generator=generator) * 0.1,
                "classifier.bias": torch.zeros(2),
            }
            diff = diff_from_dense(deltas, head, _meta(base, task_data))
            publish_version(
                session,
                store,
                task_id=task_row.id,
                diff_bytes=dumps_artifact(diff),
                nnz=diff.nnz,
                density=diff.meta.density,
                metrics={},
                config={},
                source_job_id=job_id,
            )
            tenant_id = job.tenant_id
    return {
        "settings": config,
        "sessions": sessions,
        "names": names,
        "tenant_id": tenant_id,
        "base": base,
    }


def test_a_ties_run_through_the_runner_publishes_accepted_versions_and_a_full_report(
    runner_world,
):
    world = runner_world
    with world["sessions"]() as session:
        run = catalog.create_consolidation_run(
            session,
            tenant_id=world["tenant_id"],
            base_model=world["base"].name,
            budget=1500,
            task_names=list(world["names"]),
            strategy="ties",
            tolerance=100.0,
            params={"max_length": 8, "ties_density": 0.5},
        )
    assert run_consolidation(run.id, settings=world["settings"]) == SUCCEEDED
    with world["sessions"]() as session:
        run = catalog.load_consolidation_run(session, run_id=run.id)
        versions = {
            name: catalog.list_task_versions(session, tenant_id=world["tenant_id"], name=name)
            for name in world["names"]
        }
    report = run.report
    assert report["strategy"] == "ties" and report["steps"] == 0
    assert report["config"]["ties_density"] == 0.5
    assert 0 < report["shared_nnz"] <= 1500 and report["shared_bytes"] > 0
    assert run.total_nnz_after == report["shared_nnz"]  # residuals store nothing
    assert run.shared_artifact_id is not None
    assert [row["task"] for row in report["tasks"]] == list(world["names"])
    for row in report["tasks"]:
        assert row["accepted"] is True and row["nnz"] == 0
        assert row["composed_nnz"] == report["shared_nnz"]
        assert {"metric_before", "metric_after", "bytes"} <= row.keys()
        new = versions[row["task"]][-1]
        assert row["version_after"] == new.number == 2
        assert new.consolidation_run_id == run.id
        assert new.shared_artifact_id == run.shared_artifact_id


def test_an_unknown_merge_option_is_refused_by_name():
    with pytest.raises(ConsolidationError) as caught:
        ConsolidationConfig.from_dict({"strategy": "dare", "dare_rate": 0.5})
    assert caught.value.field == "dare_rate"
