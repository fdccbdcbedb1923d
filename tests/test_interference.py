"""Interference analytics between task diffs: the definitions, the null model and the groups it
forms, the `/v1/interference` route, the `diffbank interference` command and its heatmap, and
the scheduled policy that starts one consolidation run per group.

Real parts: SparseDiffs as `loads_artifact` returns them, artifacts published on the tiny
random BERT into a migrated SQLite registry and file store, a real Redis for the policy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sqlalchemy import select

from cli import main as diffbank
from diffs.build import make_meta_consistent
from diffs.interference import (
    CHUNK_POSITIONS,
    InterferenceError,
    consolidation_groups,
    pairwise_interference,
)
from diffs.types import ArtifactMeta, SparseDiff
from diffs.write import dumps_artifact
from registry import catalog
from tests.api_support import make_world, publish_artifact

pytestmark = pytest.mark.services

# A fake base: one tensor larger than a chunk, so slices of one tensor meet across chunks.
SHAPES = {"big": (CHUNK_POSITIONS // 100 + 7, 130), "bias": (40,), "small": (60, 50)}


def _meta(fingerprint: str = "f" * 64, dtype: str = "float16") -> ArtifactMeta:
    n_params = sum(math.prod(s) for s in SHAPES.values())
    return ArtifactMeta(
        base_name="fake",
        base_fingerprint=fingerprint,
        n_params=n_params,
        task_type="classification",
        label_names=["neg", "pos"],
        value_dtype=dtype,
    )


def _diff(dense: dict[str, np.ndarray], dtype: str = "float16", **meta) -> SparseDiff:
    """A SparseDiff of the nonzeros of per-tensor dense arrays."""
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    indices, values = {}, {}
    for name, array in dense.items():
        flat = array.reshape(-1)
        where = np.flatnonzero(flat)
        if where.size:
            indices[name] = torch.from_numpy(where.astype(np.int64))
            values[name] = torch.from_numpy(flat[where].astype(np.float32)).to(torch_dtype[dtype])
    shapes = {n: SHAPES[n] for n in indices}
    return make_meta_consistent(SparseDiff(indices, values, shapes, {}, _meta(dtype=dtype, **meta)))


def _random_dense(rng: np.random.Generator, density: float) -> dict[str, np.ndarray]:
    return {
        n: (rng.random(s) < density) * rng.standard_normal(s).astype(np.float32)
        for n, s in SHAPES.items()
    }


def _as_vector(diff: SparseDiff) -> np.ndarray:
    """The diff as one dense float64 vector, tensors in sorted-name order (the test's oracle);
    a factored tensor as its r·(m + n) largest entries of U Vᵀ, picked here by a full sort."""
    parts = []
    for name in sorted(SHAPES):
        flat = np.zeros(math.prod(SHAPES[name]))
        if name in diff.factors:
            product = diff.dense(name).reshape(-1).double().numpy()
            u, v = diff.factors[name]
            keep = u.shape[1] * (u.shape[0] + v.shape[0])
            top = np.argsort(-np.abs(product), kind="stable")[:keep]
            flat[top] = product[top]
        elif name in diff.indices:
            flat[diff.indices[name].numpy()] = diff.values[name].float().numpy()
        parts.append(flat)
    return np.concatenate(parts)


def _factored(diff: SparseDiff, name: str, u: torch.Tensor, v: torch.Tensor) -> SparseDiff:
    """`diff` with factors U, V on tensor `name` (format v2)."""
    diff.factors[name] = (u, v)
    diff.shapes[name] = SHAPES[name]
    return make_meta_consistent(diff)


def _families(rng: np.random.Generator, sizes: dict[str, int], unrelated: int, density: float):
    """Dense per-tensor deltas: each family shares one support and its signs; others are random."""
    tasks = {}
    for family, size in sizes.items():
        core = _random_dense(rng, density)
        for member in range(size):
            noise = _random_dense(rng, density / 4)
            tasks[f"{family}{member}"] = {
                n: np.where(core[n] != 0, np.sign(core[n]) * rng.random(core[n].shape), noise[n])
                for n in SHAPES
            }
    for other in range(unrelated):
        tasks[f"solo{other}"] = _random_dense(rng, density)
    return tasks


# ---------------------------------------------------------------- the definitions


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_matrices_equal_their_dense_definitions(dtype):
    rng = np.random.default_rng(0)
    diffs = [_diff(_random_dense(rng, p), dtype) for p in (0.01, 0.05, 0.3, 0.01, 0.0005)]
    diffs.append(_diff({"bias": rng.standard_normal(40).astype(np.float32)}, dtype))
    matrix = pairwise_interference(diffs, [f"t{i}" for i in range(len(diffs))])

    vectors = np.stack([_as_vector(d) for d in diffs])
    support = vectors != 0
    shared = support.astype(int) @ support.T.astype(int)
    union = support.sum(1)[:, None] + support.sum(1)[None, :] - shared
    agreeing = (vectors > 0).astype(int) @ (vectors > 0).T + (vectors < 0).astype(int) @ (
        vectors < 0
    ).T
    norms = np.linalg.norm(vectors, axis=1)
    assert matrix.names == [f"t{i}" for i in range(len(diffs))]
    np.testing.assert_array_equal(matrix.support, support.sum(1))
    np.testing.assert_array_equal(matrix.shared, shared)
    np.testing.assert_allclose(matrix.jaccard, shared / union)
    with np.errstate(invalid="ignore"):
        expected_agreement = np.where(shared > 0, agreeing / np.maximum(shared, 1), np.nan)
    np.fill_diagonal(expected_agreement, 1.0)
    np.testing.assert_allclose(matrix.sign_agreement, expected_agreement)
    np.testing.assert_allclose(
        matrix.cosine, vectors @ vectors.T / np.outer(norms, norms), atol=1e-6
    )
    np.testing.assert_allclose(
        matrix.expected_shared, np.outer(support.sum(1), support.sum(1)) / vectors.shape[1]
    )


def test_diffs_without_a_shared_position_have_no_sign_agreement():
    left = np.zeros(SHAPES["small"], np.float32)
    right = np.zeros(SHAPES["small"], np.float32)
    left[0, :5], right[1, :5] = 1.0, -1.0
    matrix = pairwise_interference([_diff({"small": left}), _diff({"small": right})], ["a", "b"])
    assert matrix.shared[0, 1] == 0 and matrix.jaccard[0, 1] == 0.0
    assert math.isnan(matrix.sign_agreement[0, 1]) and matrix.cosine[0, 1] == 0.0
    as_json = matrix.to_json()
    assert as_json["sign_agreement"][0][1] is None and as_json["jaccard"][0][0] == 1.0
    json.dumps(as_json, allow_nan=False)


def test_same_support_with_opposite_signs_agrees_nowhere_and_points_away():
    rng = np.random.default_rng(1)
    dense = _random_dense(rng, 0.05)
    flipped = {n: -a for n, a in dense.items()}
    matrix = pairwise_interference([_diff(dense), _diff(flipped)], ["up", "down"])
    assert matrix.jaccard[0, 1] == 1.0 and matrix.sign_agreement[0, 1] == 0.0
    assert matrix.cosine[0, 1] == pytest.approx(-1.0)
    assert consolidation_groups(matrix, max_size=10) == []


def test_diffs_on_different_bases_are_refused_naming_both():
    rng = np.random.default_rng(2)
    ours = _diff(_random_dense(rng, 0.01))
    theirs = _diff(_random_dense(rng, 0.01), fingerprint="e" * 64)
    with pytest.raises(InterferenceError, match=r"different bases.*'mine'.*'other'"):
        pairwise_interference([ours, theirs], ["mine", "other"])
    with pytest.raises(InterferenceError, match="unique"):
        pairwise_interference([ours, ours], ["same", "same"])


def test_a_factored_tensor_counts_its_stored_size_of_largest_entries_not_every_nonzero():
    rng = np.random.default_rng(3)
    sparse = _diff(_random_dense(rng, 0.02))
    factored = _factored(
        _diff({"bias": rng.standard_normal(40).astype(np.float32)}),
        "small",
        torch.randn(60, 2).to(torch.float16),
        torch.randn(50, 2).to(torch.float16),
    )
    assert np.count_nonzero(factored.dense("small")) == 60 * 50  # U Vᵀ is dense
    matrix = pairwise_interference([sparse, factored], ["sparse", "factored"])
    assert matrix.support[1] == 40 + 2 * (60 + 50)  # what it stores: r·(m + n) per matrix
    vectors = np.stack([_as_vector(sparse), _as_vector(factored)])
    expected = vectors[0] @ vectors[1] / np.linalg.norm(vectors, axis=1).prod()
    assert matrix.cosine[0, 1] == pytest.approx(expected, abs=1e-6)
    assert matrix.shared[0, 1] == np.count_nonzero((vectors[0] != 0) & (vectors[1] != 0))


def test_two_unrelated_rank_diffs_do_not_overlap_by_construction():
    generator = torch.Generator().manual_seed(8)
    diffs = [
        _factored(
            _diff({}),
            "small",
            torch.randn(60, 2, generator=generator),
            torch.randn(50, 2, generator=generator),
        )
        for _ in range(2)
    ]
    matrix = pairwise_interference(diffs, ["left", "right"])
    np.testing.assert_array_equal(matrix.support, [220, 220])
    # whole matrices would give Jaccard 1; two random 220 of 3000 positions give about 0.04
    assert matrix.jaccard[0, 1] < 0.1
    assert consolidation_groups(matrix, max_size=10) == []


@pytest.mark.parametrize("zero_first", [True, False])
def test_a_factored_tensor_whose_product_is_zero_changes_nothing(zero_first):
    rng = np.random.default_rng(9)
    zero = _factored(
        _diff({"bias": rng.standard_normal(40).astype(np.float32)}),
        "small",
        torch.zeros(60, 1),
        torch.randn(50, 1),
    )
    others = [_diff(_random_dense(rng, 0.3)) for _ in range(2)]
    diffs = [zero, *others] if zero_first else [*others, zero]  # last: reduceat's edge
    matrix = pairwise_interference(diffs)
    vectors = np.stack([_as_vector(d) for d in diffs])
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_array_equal(matrix.support, (vectors != 0).sum(1))
    np.testing.assert_allclose(
        matrix.cosine, vectors @ vectors.T / np.outer(norms, norms), rtol=1e-5, atol=1e-9
    )


# ---------------------------------------------------------------- null model and groups


def test_groups_are_the_families_that_overlap_and_agree_not_the_unrelated_tasks():
    rng = np.random.default_rng(4)
    tasks = _families(rng, {"a": 3, "b": 3}, unrelated=3, density=0.02)
    matrix = pairwise_interference([_diff(d) for d in tasks.values()], list(tasks))
    assert consolidation_groups(matrix, max_size=10) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    lift = matrix.overlap_lift
    assert lift[0, 1] > 10 and 0.5 < lift[0, 3] < 2  # a family vs chance; across families ~ 1
    capped = consolidation_groups(matrix, max_size=2)
    assert all(len(g) == 2 for g in capped) and len(capped) == 2
    assert all(g[0][0] == g[1][0] for g in capped)  # never across families


def _pair_on_big(rng: np.random.Generator, density: float, agreement: float):
    """Two diffs on one support of `density` of `big`, signs agreeing on `agreement` of it."""
    shape = SHAPES["big"]
    values = np.where(rng.random(shape) < density, rng.standard_normal(shape), 0.0)
    other = np.where(rng.random(shape) < agreement, values, -values)
    diffs = [_diff({"big": values.astype(np.float32)}), _diff({"big": other.astype(np.float32)})]
    return pairwise_interference(diffs, ["x", "y"])


def test_significant_pairs_below_the_effect_size_minimums_form_no_group():
    rng = np.random.default_rng(10)
    weak_signs = _pair_on_big(rng, 0.3, 0.52)  # 10^5 shared positions: 52% is significant
    assert 0.5 < weak_signs.sign_agreement[0, 1] < 0.55 and weak_signs.overlap_lift[0, 1] > 2
    assert consolidation_groups(weak_signs, max_size=2) == []
    assert consolidation_groups(weak_signs, max_size=2, min_sign_agreement=0.5) == [["x", "y"]]
    # supports of 60% of the base cannot share more than 1/0.6 times chance
    dense = _pair_on_big(rng, 0.6, 1.0)
    assert dense.sign_agreement[0, 1] == 1.0 and 1 < dense.overlap_lift[0, 1] < 2
    assert consolidation_groups(dense, max_size=2) == []
    assert consolidation_groups(dense, max_size=2, min_overlap_lift=1.0) == [["x", "y"]]


def _tiny_artifacts(tiny_base_dir, *, seed: int) -> dict[str, bytes]:
    """Artifacts on the tiny base: families sharing support and sign, plus unrelated tasks."""
    from diffs.basemodel import build_model, load_base
    from diffs.build import diff_from_dense

    base = load_base(str(tiny_base_dir))
    rng = np.random.default_rng(seed)
    params = dict(base.encoder.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}

    def dense(density: float) -> dict[str, np.ndarray]:
        return {
            n: (rng.random(s) < density) * rng.standard_normal(s).astype(np.float32)
            for n, s in shapes.items()
        }

    families = {}
    for family in ("a", "b"):
        core = dense(0.02)
        for member in range(3):
            noise = dense(0.005)
            families[f"{family}{member}"] = {
                n: np.where(core[n] != 0, np.sign(core[n]) * (0.5 + rng.random(s)), noise[n])
                for n, s in shapes.items()
            }
    for other in range(2):
        families[f"solo{other}"] = dense(0.02)
    model = build_model(base, task_type="classification", num_labels=2)
    encoder_ids = {id(p) for p in model.base_model.parameters()}
    head = {n: p.detach() for n, p in model.named_parameters() if id(p) not in encoder_ids}
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type="classification",
        label_names=["neg", "pos"],
        max_length=64,
    )
    return {
        name: dumps_artifact(
            diff_from_dense({n: torch.from_numpy(a).float() for n, a in d.items()}, head, meta)
        )
        for name, d in families.items()
    }


@pytest.fixture(scope="module")
def artifacts(tiny_base_dir) -> dict[str, bytes]:
    return _tiny_artifacts(tiny_base_dir, seed=7)


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server, tiny_base_dir, artifacts):
    """alice has two families of three tasks and two unrelated tasks; bob has one task."""
    world = make_world(tmp_path_factory.mktemp("interference"), redis_server.url, tiny_base_dir)
    for name, data in artifacts.items():
        publish_artifact(
            world, "alice", name, data, task_type="classification", labels=["neg", "pos"]
        )
    publish_artifact(
        world, "bob", "bobs", artifacts["solo0"], task_type="classification", labels=["neg", "pos"]
    )
    return world


def test_route_answers_the_matrices_and_groups_of_the_named_tasks(world):
    response = world.client.get(
        "/v1/interference", params={"tasks": "a0,a1,b0,solo0"}, headers=world.headers("alice")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tasks"] == ["a0", "a1", "b0", "solo0"] and body["versions"] == [1, 1, 1, 1]
    assert body["base_model"] == world.base_dir.name
    for key in ("jaccard", "sign_agreement", "cosine", "shared"):
        assert len(body[key]) == 4 and all(len(row) == 4 for row in body[key])
        assert body[key][0][1] == body[key][1][0]
    assert [body["jaccard"][i][i] for i in range(4)] == [1.0] * 4
    assert body["jaccard"][0][1] > 0.3 and body["sign_agreement"][0][1] > 0.9
    assert body["jaccard"][0][2] < 0.05 and body["overlap_lift"][0][1] > 10
    assert body["groups"] == [["a0", "a1"]]


def test_route_defaults_to_every_task_of_the_caller_on_the_base(world):
    from cli.http_client import DiffbankClient, DiffbankError

    client = DiffbankClient("http://testserver", world.keys["reader"], http=world.client)
    with pytest.raises(DiffbankError, match="no task with a published version"):
        client.interference()  # carol (reader) has no task
    client = DiffbankClient("http://testserver", world.keys["alice"], http=world.client)
    body = client.interference(base_model=str(world.base_dir))
    assert body["tasks"] == ["a0", "a1", "a2", "b0", "b1", "b2", "solo0", "solo1"]
    assert body["groups"] == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]


def test_another_tenants_task_answers_as_unknown(world):
    response = world.client.get(
        "/v1/interference", params={"tasks": "bobs,a0"}, headers=world.headers("alice")
    )
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["field"] == "tasks" and "'bobs'" in error["message"]
    own = world.client.get("/v1/interference", headers=world.headers("bob"))
    assert own.status_code == 200 and own.json()["tasks"] == ["bobs"]


@pytest.fixture(scope="module")
def capped(tmp_path_factory, redis_server, tiny_base_dir, artifacts):
    """A server that compares at most two tasks; alice has three."""
    capped = make_world(
        tmp_path_factory.mktemp("capped"), redis_server.url, tiny_base_dir, interference_max_tasks=2
    )
    for name in ("a0", "a1", "a2"):
        publish_artifact(
            capped,
            "alice",
            name,
            artifacts[name],
            task_type="classification",
            labels=["neg", "pos"],
        )
    return capped


@pytest.mark.parametrize(
    ("tasks", "code"),
    [
        ("a0,,a1", "invalid_tasks"),
        ("a0,a0", "invalid_tasks"),
        ("a0,a1,a2", "too_many_tasks"),
        (None, "too_many_tasks"),
    ],
)
def test_bad_task_lists_and_too_many_tasks_are_422_naming_the_field(capped, tasks, code):
    params = {} if tasks is None else {"tasks": tasks}
    response = capped.client.get("/v1/interference", params=params, headers=capped.headers("alice"))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["field"] == "tasks"


def test_a_base_model_other_than_the_tasks_is_refused(world):
    response = world.client.get(
        "/v1/interference",
        params={"tasks": "a0,a1", "base_model": "all-MiniLM-L6-v2"},
        headers=world.headers("alice"),
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "base_model"


# ---------------------------------------------------------------- the command


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_command_compares_local_files_and_draws_a_heatmap(artifacts, tmp_path, capsys):
    files = []
    for name in ("a0", "a1", "solo0"):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(artifacts[name])
        files.append(str(path))
    plot = tmp_path / "interference.png"
    assert diffbank(["interference", *files, "--plot", str(plot), "--json"]) == 0
    report = _last_json(capsys.readouterr().out)
    assert report["tasks"] == ["a0", "a1", "solo0"] and report["groups"] == [["a0", "a1"]]
    assert report["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    assert diffbank(["interference", *files]) == 0
    table = capsys.readouterr().out
    assert "support overlap (Jaccard)" in table and "cosine" in table
    assert "consolidation groups: a0, a1" in table


def test_command_refuses_files_of_different_bases(artifacts, tmp_path, capsys):
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(artifacts["a0"])
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(dumps_artifact(_diff(_random_dense(np.random.default_rng(6), 0.01))))
    assert diffbank(["interference", str(ours), str(theirs)]) == 1
    assert "different bases" in capsys.readouterr().err


# ---------------------------------------------------------------- the scheduled policy


def test_scheduled_policy_starts_one_run_per_group_not_one_of_everything(
    tmp_path, redis_server, tiny_base_dir, artifacts
):
    import redis

    from registry.models import ConsolidationRun
    from worker.consolidation.policy import apply_consolidation_policy, stored_rows

    policy_world = make_world(tmp_path, redis_server.url, tiny_base_dir)
    for name, data in artifacts.items():
        publish_artifact(
            policy_world, "alice", name, data, task_type="classification", labels=["neg", "pos"]
        )
    with policy_world.session_factory() as session:
        stored = {row[2]: row[3] for row in stored_rows(session)}
    total = sum(stored.values())
    queue = redis.Redis.from_url(redis_server.url)
    queue.delete("consolidate")
    settings = policy_world.settings.model_copy(update={"consolidation_budget_nnz": total // 2})

    started = apply_consolidation_policy(settings)
    with policy_world.session_factory() as session, session.begin():
        runs = session.scalars(select(ConsolidationRun).order_by(ConsolidationRun.id)).all()
    assert [r.id for r in runs] == started and queue.llen("consolidate") == 2
    assert [sorted(r.task_names) for r in runs] == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    for run in runs:
        group_stored = sum(stored[name] for name in run.task_names)
        assert run.trigger == "schedule"
        assert run.budget == (total // 2) * group_stored // total
    # while both runs are queued, the next tick starts nothing; the unrelated tasks stay out
    assert apply_consolidation_policy(settings) == []
    with policy_world.session_factory() as session:
        runs = catalog.list_consolidation_runs(session, tenant_id=policy_world.tenant_ids["alice"])[
            0
        ]
    assert len(runs) == 2 and not {"solo0", "solo1"} & {n for r in runs for n in r.task_names}
    queue.delete("consolidate")


def test_a_task_on_another_base_fingerprint_is_left_out_and_later_tenants_still_get_runs(
    tmp_path, redis_server, tiny_base_dir, artifacts
):
    import dataclasses

    import redis

    from diffs.read import loads_artifact
    from registry.models import ConsolidationRun
    from worker.consolidation.policy import apply_consolidation_policy, stored_rows

    policy_world = make_world(tmp_path, redis_server.url, tiny_base_dir)
    labels = {"task_type": "classification", "labels": ["neg", "pos"]}
    for name in ("a0", "a1", "a2", "b0", "b1", "b2"):
        publish_artifact(policy_world, "alice", name, artifacts[name], **labels)
    stale = loads_artifact(artifacts["solo0"])  # as if trained before the base was re-registered
    stale.meta = dataclasses.replace(stale.meta, base_fingerprint="e" * 64)
    publish_artifact(policy_world, "alice", "stale", dumps_artifact(stale), **labels)
    for name in ("a0", "a1"):
        publish_artifact(policy_world, "bob", name, artifacts[name], **labels)
    bob = policy_world.tenant_ids["bob"]
    with policy_world.session_factory() as session:
        bob_total = sum(row[3] for row in stored_rows(session) if row[0] == bob)
    queue = redis.Redis.from_url(redis_server.url)
    queue.delete("consolidate")
    settings = policy_world.settings.model_copy(update={"consolidation_budget_nnz": bob_total - 1})

    started = apply_consolidation_policy(settings)
    with policy_world.session_factory() as session, session.begin():
        runs = session.scalars(select(ConsolidationRun).order_by(ConsolidationRun.id)).all()
        started_runs = [(r.tenant_id, sorted(r.task_names)) for r in runs]
    assert [r.id for r in runs] == started
    alice = policy_world.tenant_ids["alice"]
    assert started_runs == [
        (alice, ["a0", "a1", "a2"]),
        (alice, ["b0", "b1", "b2"]),
        (bob, ["a0", "a1"]),
    ]
    queue.delete("consolidate")


def _alice_versions(world) -> dict:
    from worker.consolidation.policy import active_versions

    with world.session_factory() as session:
        rows = active_versions(session)
    return {name: v for tenant, _, name, v in rows if tenant == world.tenant_ids["alice"]}


def test_policy_groups_are_cached_by_the_versions_so_an_unchanged_tick_reads_no_diff(
    world, tmp_path
):
    from registry.stores import open_store
    from worker.consolidation.policy import interference_groups

    versions = _alice_versions(world)
    groups = interference_groups(world.store, versions, world.settings)
    assert groups == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    empty = open_store((tmp_path / "empty").resolve().as_uri(), world.settings)
    assert interference_groups(empty, versions, world.settings) == groups  # no diff read
    # the group settings are part of the key: new thresholds read the diffs again
    stricter = world.settings.model_copy(update={"consolidation_group_min_overlap_lift": 1e9})
    assert interference_groups(empty, versions, stricter) == []  # every read fails: no group
    assert interference_groups(world.store, versions, stricter) == []


def test_the_policy_compares_no_busy_task_and_at_most_the_cap_storing_the_most(world):
    from worker.consolidation.policy import compared_tasks, stored_entries_of

    versions = _alice_versions(world)
    compared = compared_tasks(versions, {"a0"}, 3)
    assert len(compared) == 3 and "a0" not in compared
    own = {name: stored_entries_of(version)[0] for name, version in versions.items()}
    rest = set(versions) - set(compared) - {"a0"}
    assert min(own[n] for n in compared) >= max(own[n] for n in rest)
    assert compared_tasks(versions, set(), 100) == versions
