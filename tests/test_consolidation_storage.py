"""The budget is what is stored: factor artifacts (format version 2), composition on request.

Real parts: the tiny random BERT, the artifact format, the consolidation fit, the mixed-task
predictor, and (for the download paths) the app over SQLite + file store + a real Redis broker.
Factored diffs here are random factors on every matrix the rank strategy factors, plus sparse
entries on the other tensors, as a rank-strategy consolidation writes them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from diffs.apply import apply_diff, build_task_model
from diffs.basemodel import LoadedBase, base_fingerprint, build_model, load_base
from diffs.build import diff_from_dense, make_meta_consistent
from diffs.compose import compose_diffs
from diffs.container import pack_file
from diffs.read import loads_artifact
from diffs.types import (
    MAX_UNCHECKED_FACTORED,
    VALUE_DTYPES,
    ArtifactError,
    ArtifactMeta,
    SparseDiff,
    factor_key,
)
from diffs.validation import check_artifact
from diffs.write import dumps_artifact
from worker.consolidation import lowrank

V1_FIXTURE = Path(__file__).parent / "fixtures" / "artifact_v1.safetensors"


@pytest.fixture(scope="module")
def base(tiny_base_dir) -> LoadedBase:
    return load_base(str(tiny_base_dir))


def factored_diff(
    base: LoadedBase,
    *,
    seed: int,
    rank: int = 2,
    head: bool = True,
    density: float = 0.05,
    value_dtype: str = "float32",
) -> SparseDiff:
    """Random factors on every matrix the rank strategy factors, sparse entries elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    dtype = VALUE_DTYPES[value_dtype]
    indices, values, factors, shapes = {}, {}, {}, {}
    for name, shape in base.shapes.items():
        if lowrank.is_factored(name, shape):
            u = torch.randn(shape[0], rank, generator=generator) * 0.2
            v = torch.randn(shape[1], rank, generator=generator) * 0.2
            factors[name] = (u.to(dtype), v.to(dtype))
        else:
            numel = math.prod(shape)
            count = max(1, round(density * min(numel, 4096)))
            positions = torch.randperm(numel, generator=generator)[:count].sort().values
            indices[name] = positions
            values[name] = (torch.randn(count, generator=generator) * 0.1).to(dtype)
        shapes[name] = tuple(shape)
    hidden = base.config.hidden_size
    heads = (
        {
            "classifier.weight": torch.randn(2, hidden, generator=generator),
            "classifier.bias": torch.randn(2, generator=generator),
        }
        if head
        else {}
    )
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type="classification",
        label_names=["neg", "pos"],
        max_length=16,
        value_dtype=value_dtype,
    )
    return make_meta_consistent(SparseDiff(indices, values, shapes, heads, meta, factors))


def header_of(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def assert_same_diff(a: SparseDiff, b: SparseDiff) -> None:
    """Entries, factors, head and meta agree bit for bit."""
    assert a.meta == b.meta and a.shapes == b.shapes
    assert sorted(a.indices) == sorted(b.indices) and sorted(a.factors) == sorted(b.factors)
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name])
        assert torch.equal(a.values[name].view(torch.uint8), b.values[name].view(torch.uint8))
    for name, (u, v) in a.factors.items():
        assert torch.equal(u, b.factors[name][0]) and torch.equal(v, b.factors[name][1])
    assert sorted(a.head) == sorted(b.head)


# ---------------------------------------------------------------- the format


def test_rank_artifact_stores_factors_not_products(base):
    diff = factored_diff(base, seed=0, rank=2, value_dtype="float16")
    data = dumps_artifact(diff)
    header = header_of(data)
    metadata = header["__metadata__"]
    assert metadata["format_version"] == "2"
    factored = [name for name, shape in base.shapes.items() if lowrank.is_factored(name, shape)]
    layout = {name for name, _, _ in json.loads(metadata["layout"])}
    assert not layout & set(factored)  # no entry of a factored matrix is in the index stream
    assert [entry[0] for entry in json.loads(metadata["factors"])] == sorted(factored)
    for name in factored:
        m, n = base.shapes[name]
        assert header[factor_key(name, "u")]["shape"] == [m, 2]
        assert header[factor_key(name, "v")]["shape"] == [n, 2]
    factor_values = sum(2 * sum(base.shapes[name]) for name in factored)
    assert diff.factor_values == factor_values
    assert diff.nnz == diff.meta.nnz == diff.entry_count + factor_values
    # the same diff written the old way: every entry of each product in the index stream
    dense = {name: diff.dense(name) for name in diff.tensor_names}
    products = diff_from_dense(dense, diff.head, diff.meta, "float16")
    product_bytes = len(dumps_artifact(products))
    # 2 x (32 + 32) values instead of 32 x 32 per matrix: about a fifth of the bytes here
    assert len(data) < 0.3 * product_bytes, (len(data), product_bytes)


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
def test_factored_artifact_round_trips_bit_for_bit(base, value_dtype):
    diff = factored_diff(base, seed=1, value_dtype=value_dtype)
    loaded = loads_artifact(
        dumps_artifact(diff), expected_fingerprint=base.fingerprint, base_shapes=base.shapes
    )
    assert_same_diff(diff, loaded)
    assert loaded.meta.format_version == 2
    assert dumps_artifact(loaded) == dumps_artifact(diff)  # the same diff, the same bytes


def test_version_1_artifact_written_before_factors_still_loads():
    loaded = loads_artifact(V1_FIXTURE.read_bytes())
    assert loaded.meta.format_version == 1 and loaded.factors == {}
    assert loaded.nnz == loaded.entry_count == 6
    assert loaded.indices["pooler.dense.bias"].tolist() == [2, 5]
    assert loaded.values["pooler.dense.bias"].tolist() == [0.25, -0.5]
    assert loaded.meta.label_names == ["neg", "pos"] and set(loaded.head) == {
        "classifier.weight",
        "classifier.bias",
    }


def test_a_diff_without_factors_is_still_written_as_version_1():
    old = V1_FIXTURE.read_bytes()
    new = dumps_artifact(loads_artifact(old))
    old_meta, new_meta = header_of(old)["__metadata__"], header_of(new)["__metadata__"]
    assert new_meta["format_version"] == "1" and "factors" not in new_meta
    assert {k: v for k, v in new_meta.items() if k != "sha256"} == {
        k: v for k, v in old_meta.items() if k != "sha256"
    }
    old_tensors, new_tensors = load_tensors(old), load_tensors(new)
    assert sorted(old_tensors) == sorted(new_tensors)
    for key, tensor in old_tensors.items():
        assert torch.equal(tensor, new_tensors[key]), key


def repack(data: bytes, *, tensors=None, drop=(), metadata=None, drop_metadata=()) -> bytes:
    """The artifact's file with tensors / metadata replaced or dropped, correctly checksummed."""
    contents = load_tensors(data)
    meta = dict(header_of(data)["__metadata__"])
    del meta["sha256"]
    contents.update(tensors or {})
    for key in drop:
        del contents[key]
    meta.update(metadata or {})
    for key in drop_metadata:
        del meta[key]
    return pack_file(contents, meta)


FACTOR_NAME = "encoder.layer.0.intermediate.dense.weight"  # 64 x 32


@dataclass
class FactorFile:
    """A good factored artifact and the parts of it a corruption changes."""

    diff: SparseDiff
    good: bytes
    factors: list  # the `factors` metadata: [[name, [m, n], r], ...]
    meta: dict  # the `meta` metadata
    u_key: str = factor_key(FACTOR_NAME, "u")
    v_key: str = factor_key(FACTOR_NAME, "v")

    @property
    def u(self) -> torch.Tensor:
        return self.diff.factors[FACTOR_NAME][0]

    @property
    def v(self) -> torch.Tensor:
        return self.diff.factors[FACTOR_NAME][1]

    def with_factors(self, edit: Callable[[str, list, int], list]) -> bytes:
        """The file with each `factors` entry replaced by edit(name, shape, rank)."""
        entries = [edit(n, s, r) if n == FACTOR_NAME else [n, s, r] for n, s, r in self.factors]
        return repack(self.good, metadata={"factors": json.dumps(entries)})


def _with_value(tensor: torch.Tensor, where: tuple[int, int], value: float) -> torch.Tensor:
    changed = tensor.clone()
    changed[where] = value
    return changed


# Each way a factor tensor or its metadata can be broken, and the words of the error.
CORRUPTIONS: dict[str, tuple[Callable[[FactorFile], bytes], str]] = {
    "U with a row too many": (
        lambda f: repack(f.good, tensors={f.u_key: torch.zeros(65, 2, dtype=torch.float16)}),
        f"factors of {FACTOR_NAME!r} have shapes U (65, 2)",
    ),
    "V of another rank": (
        lambda f: repack(f.good, tensors={f.v_key: torch.zeros(32, 3, dtype=torch.float16)}),
        "needs U (64, r) and V (32, r)",
    ),
    "rank in the metadata disagrees": (
        lambda f: f.with_factors(lambda n, s, r: [n, s, r + 1]),
        "meta.nnz",
    ),
    "NaN in V": (
        lambda f: repack(f.good, tensors={f.v_key: _with_value(f.v, (3, 1), float("nan"))}),
        "NaN or infinity",
    ),
    "infinity in U": (
        lambda f: repack(f.good, tensors={f.u_key: _with_value(f.u, (0, 0), float("inf"))}),
        "NaN or infinity",
    ),
    "factors of another dtype": (
        lambda f: repack(f.good, tensors={f.u_key: f.u.float(), f.v_key: f.v.float()}),
        "must be float16",
    ),
    "a factor tensor missing": (lambda f: repack(f.good, drop=[f.v_key]), "missing"),
    "factors of a 1-D tensor": (
        lambda f: f.with_factors(lambda n, s, r: [n, [s[0]], r]),
        "bad factors entry",
    ),
    "version 2 without factors metadata": (
        lambda f: repack(f.good, drop_metadata=["factors"]),
        "missing 'factors'",
    ),
    "factors metadata in a version 1 file": (
        lambda f: repack(
            f.good,
            metadata={"format_version": "1", "meta": json.dumps(dict(f.meta, format_version=1))},
        ),
        "version 1 artifact has no 'factors'",
    ),
    "meta.nnz without the factor values": (
        lambda f: repack(
            f.good, metadata={"meta": json.dumps(dict(f.meta, nnz=f.diff.entry_count))}
        ),
        "meta.nnz",
    ),
    "an unlisted factor tensor": (
        lambda f: repack(f.good, tensors={factor_key("pooler.dense.bias", "u"): torch.zeros(1)}),
        "unexpected",
    ),
}


@pytest.fixture(scope="module")
def factor_file(base) -> FactorFile:
    diff = factored_diff(base, seed=2, value_dtype="float16")
    good = dumps_artifact(diff)
    metadata = header_of(good)["__metadata__"]
    return FactorFile(diff, good, json.loads(metadata["factors"]), json.loads(metadata["meta"]))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_factor_tensors_are_rejected_with_a_clear_error(factor_file, case):
    corrupt, words = CORRUPTIONS[case]
    with pytest.raises(ArtifactError, match=re.escape(words)):
        loads_artifact(corrupt(factor_file))


def huge_factored_file(m: int, n: int) -> bytes:
    """A v2 file whose one factored tensor claims an m x n matrix (rank 1, no base)."""
    meta = ArtifactMeta(
        base_name="claims",
        base_fingerprint="0" * 64,
        n_params=m * n,
        task_type="classification",
        label_names=["neg", "pos"],
    )
    u, v = torch.full((m, 1), 1e-3, dtype=torch.float16), torch.ones(n, 1, dtype=torch.float16)
    diff = SparseDiff({}, {}, {"huge.weight": (m, n)}, {}, meta, {"huge.weight": (u, v)})
    return dumps_artifact(make_meta_consistent(diff))


def test_a_small_file_claiming_a_huge_factored_matrix_is_refused_without_its_base(tmp_path, capsys):
    from cli import main

    claims = huge_factored_file(2**20, 2**20)  # 4 MB of factors, 2**40 entries as a product
    assert len(claims) < 5 * 2**20
    with pytest.raises(ArtifactError, match="claim a 1048576x1048576 matrix"):
        loads_artifact(claims)
    with pytest.raises(ArtifactError, match="does not exist in the base"):
        loads_artifact(claims, base_shapes={"other.weight": (2, 2)})  # a base decides by shapes
    path = tmp_path / "huge.safetensors"
    path.write_bytes(claims)
    assert main(["interference", str(path)]) == 1
    assert "claim a 1048576x1048576 matrix" in capsys.readouterr().err
    side = math.isqrt(MAX_UNCHECKED_FACTORED)
    assert loads_artifact(huge_factored_file(side, side)).shapes["huge.weight"] == (side, side)


def test_factors_that_do_not_fit_the_base_are_rejected_on_read_and_by_check_artifact(base):
    diff = factored_diff(base, seed=3)
    data = dumps_artifact(diff)
    shapes = dict(base.shapes)
    shapes[FACTOR_NAME] = (32, 64)
    with pytest.raises(ArtifactError, match=f"shape of {FACTOR_NAME!r}"):
        loads_artifact(data, base_shapes=shapes)
    del shapes[FACTOR_NAME]
    with pytest.raises(ArtifactError, match="does not exist in the base"):
        loads_artifact(data, base_shapes=shapes)
    u, v = diff.factors[FACTOR_NAME]
    wrong = copy.copy(diff)
    wrong.factors = {**diff.factors, FACTOR_NAME: (u[:, :1], v)}
    with pytest.raises(ArtifactError, match="needs U"):
        check_artifact(wrong, base)
    with pytest.raises(ArtifactError, match="needs U"):
        dumps_artifact(wrong)
    nan = copy.copy(diff)
    nan.factors = {**diff.factors, FACTOR_NAME: (u, torch.full_like(v, float("nan")))}
    with pytest.raises(ArtifactError, match="NaN"):
        build_task_model(base, nan)
    elsewhere = copy.copy(diff)
    elsewhere.shapes = {**diff.shapes, FACTOR_NAME: (32, 64)}
    elsewhere.factors = {**diff.factors, FACTOR_NAME: (v, u)}
    with pytest.raises(ArtifactError, match=f"shape of {FACTOR_NAME!r}"):
        check_artifact(elsewhere, base)


# ---------------------------------------------------------------- applying and serving


def test_applying_a_factored_diff_adds_the_dense_product_and_entries_and_reverts_exactly(base):
    diff = factored_diff(base, seed=4)
    # one matrix with both a low-rank part and entries
    diff.indices[FACTOR_NAME] = torch.tensor([0, 5, 2047])
    diff.values[FACTOR_NAME] = torch.tensor([1.0, -2.0, 0.5])
    make_meta_consistent(diff)
    diff = loads_artifact(dumps_artifact(diff), base_shapes=base.shapes)
    model = build_model(base, task_type="classification", num_labels=2)
    params = dict(model.base_model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    with apply_diff(model.base_model, diff):
        for name, param in params.items():
            expected = before[name].clone()
            if name in diff.factors:
                u, v = diff.factors[name]
                expected += u.float() @ v.float().T
            if name in diff.indices:
                expected.view(-1)[diff.indices[name]] += diff.values[name].float()
            torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-6, msg=name)
    assert base_fingerprint(model.base_model) == base.fingerprint


def test_mixed_forward_keeps_factors_and_predicts_like_the_merged_model(base, tiny_base_dir):
    from serving.engine import Predictor

    shared = factored_diff(base, seed=5, head=False)
    residual = factored_diff(base, seed=6, rank=1)
    composed = compose_diffs(shared, residual)
    texts = ["a fine day", "a terrible night", "nothing much at all"]
    predictor = Predictor(cache_size=8)
    parts = [
        predictor.resolve(str(tiny_base_dir), "shared", lambda: dumps_artifact(shared)),
        predictor.resolve(str(tiny_base_dir), "residual", lambda: dumps_artifact(residual)),
    ]
    (factored,) = predictor.run_batch([predictor.prepare(str(tiny_base_dir), parts, texts)])
    merged = predictor.predict_artifact(dumps_artifact(composed), texts, base=str(tiny_base_dir))
    assert [p["label"] for p in factored] == [p["label"] for p in merged]
    for f, m in zip(factored, merged, strict=True):
        assert abs(f["score"] - m["score"]) < 1e-5
    # the decoded form keeps U and V (r·(m + n) values), not an m x n correction
    resident = predictor.resolve(str(tiny_base_dir), "residual", lambda: b"")
    module = resident.decoded.modules[FACTOR_NAME.removesuffix(".weight")]
    assert module.weight_span == (-1, -1) and tuple(module.up.shape) == (64, 1)
    assert tuple(module.down.shape) == (32, 1)


def test_compose_sums_entries_on_the_union_and_concatenates_factors(base):
    shared = factored_diff(base, seed=7, head=False, density=0.5)
    residual = factored_diff(base, seed=8, rank=3, density=0.5)
    composed = compose_diffs(shared, residual)
    for name in composed.tensor_names:
        torch.testing.assert_close(
            composed.dense(name), shared.dense(name) + residual.dense(name), msg=name
        )
    assert composed.factors[FACTOR_NAME][0].shape == (64, 5)
    assert composed.nnz <= shared.nnz + residual.nnz
    assert composed.factor_values == shared.factor_values + residual.factor_values
    assert set(composed.head) == set(residual.head) and composed.meta.label_names == ["neg", "pos"]
    other = copy.deepcopy(shared)
    other.meta.base_fingerprint = "0" * 64
    with pytest.raises(ArtifactError, match="different bases"):
        compose_diffs(other, residual)


def test_inspect_reports_entries_factor_values_and_ranks(base):
    from cli.inspect import summary

    diff = factored_diff(base, seed=9)
    info = summary(diff, len(dumps_artifact(diff)))
    assert info["entries"] == diff.entry_count and info["factor_values"] == diff.factor_values
    rows = {row["name"]: row for row in info["tensors"]}
    assert rows[FACTOR_NAME]["rank"] == 2 and rows[FACTOR_NAME]["nnz"] == 2 * (64 + 32)
    assert sum(row["nnz"] for row in info["tensors"]) == diff.nnz
    assert sum(info["layers"].values()) == diff.nnz


# ---------------------------------------------------------------- consolidation artifacts


def _task(root: Path, base: LoadedBase, name: str, seed: int):
    from worker.consolidation.config import ConsolidationTask
    from worker.data import load_task_data

    rng = random.Random(name)
    words = ("bad", "good")
    lines = []
    for _ in range(32):
        label = rng.randrange(2)
        lines.append(
            json.dumps({"text": f"{words[label]} item {rng.randrange(9)}", "label": label})
        )
    (root / name).mkdir()
    (root / name / "train.jsonl").write_text("\n".join(lines) + "\n")
    data = load_task_data(root / name, validation_fraction=0.25)
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for n, p in base.encoder.named_parameters():
        if lowrank.is_factored(n, tuple(p.shape)):  # a strong rank-one diff per matrix
            u = torch.randn(p.shape[0], 1, generator=generator)
            v = torch.randn(p.shape[1], 1, generator=generator)
            deltas[n] = 0.5 * (u / u.norm()) @ (v / v.norm()).T
        else:
            mask = torch.rand(p.shape, generator=generator) < 0.0005
            deltas[n] = torch.randn(p.shape, generator=generator) * 0.01 * mask
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
    return ConsolidationTask(name, data, diff_from_dense(deltas, head, meta, "float16"))


@pytest.fixture(scope="module")
def consolidation_tasks(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("storage-tasks")
    return [_task(root, base, name, seed) for seed, name in enumerate(("a", "b"))]


def _consolidate(tasks, base, **overrides):
    from worker.consolidation.config import ConsolidationConfig
    from worker.consolidation.fit import consolidate

    values = dict(budget=3000, epochs=0.5, fix_epochs=0.5, batch_size=16, max_length=16, rank=2)
    values.update(overrides, device="cpu")
    return consolidate(tasks, ConsolidationConfig(**values), base=base, run_id=3)


@pytest.fixture(scope="module")
def rank_run(consolidation_tasks, base):
    return _consolidate(consolidation_tasks, base, strategy="rank")


def test_rank_consolidation_stores_factors_and_exactly_its_stored_entries(rank_run, base):
    result = rank_run
    blobs = [dumps_artifact(result.shared)] + [dumps_artifact(o.residual) for o in result.tasks]
    stored = [loads_artifact(blob, base_shapes=base.shapes) for blob in blobs]
    # the budget counts r·(m + n) per kept component and 1 per entry: that is what is stored
    assert sum(d.nnz for d in stored) == result.total_nnz <= 3000
    assert stored[0].nnz == result.shared_nnz
    for outcome, residual in zip(result.tasks, stored[1:], strict=True):
        assert residual.nnz == outcome.nnz
        assert not set(residual.factors) & set(residual.indices)
        for name in residual.factors:
            assert lowrank.is_factored(name, base.shapes[name])
    assert any(d.factors for d in stored)
    for blob, diff in zip(blobs, stored, strict=True):
        if diff.factors:
            assert header_of(blob)["__metadata__"]["format_version"] == "2"
            products = {name: diff.dense(name) for name in diff.tensor_names}
            dense = dumps_artifact(diff_from_dense(products, diff.head, diff.meta, "float16"))
            assert len(blob) < 0.3 * len(dense)  # about a sixth on the tiny base, rank 1


def test_rank_composed_diff_equals_shared_then_residual(rank_run, base):
    result = rank_run
    for outcome in result.tasks:
        assert outcome.composed.meta.extra["consolidation"]["role"] == "composed"
        in_turn, composed = copy.deepcopy(base.encoder), copy.deepcopy(base.encoder)
        apply_diff(in_turn, result.shared)
        apply_diff(in_turn, outcome.residual)
        apply_diff(composed, outcome.composed)
        for (name, a), (_, b) in zip(
            in_turn.named_parameters(), composed.named_parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_elementwise_consolidation_artifacts_stay_version_1(consolidation_tasks, base):
    result = _consolidate(consolidation_tasks, base, strategy="elementwise", budget=1500)
    blobs = [dumps_artifact(result.shared)] + [dumps_artifact(o.residual) for o in result.tasks]
    assert {header_of(b)["__metadata__"]["format_version"] for b in blobs} == {"1"}
    assert sum(loads_artifact(b).nnz for b in blobs) == result.total_nnz <= 1500


# ---------------------------------------------------------------- publishing and reading back


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server, tiny_base_dir, base):
    """carol's task `ranked`: v1 and v2 ordinary diffs, v3 a consolidated version composed on
    request (its residual only, beside the shared diff)."""
    from registry import catalog
    from registry.publish import (
        publish_consolidated_version,
        publish_shared_diff,
        publish_version,
    )
    from tests.api_support import make_world, publish_artifact

    world = make_world(tmp_path_factory.mktemp("storage-api"), redis_server.url, tiny_base_dir)
    plain = dumps_artifact(factored_diff(base, seed=20, rank=1))
    publish_artifact(
        world, "admin", "ranked", plain, task_type="classification", labels=["neg", "pos"]
    )
    shared = factored_diff(base, seed=21, head=False)
    residual = factored_diff(base, seed=22, rank=1)
    tenant = world.tenant_ids["admin"]
    with world.session_factory() as session:
        task = catalog.get_task(session, tenant_id=tenant, name="ranked")
        publish_version(  # version 2: another plain (single-blob) version
            session,
            world.store,
            task_id=task.id,
            diff_bytes=dumps_artifact(factored_diff(base, seed=23, rank=1)),
            nnz=1,
            density=0.0,
            metrics={},
            config={},
        )
        run = catalog.create_consolidation_run(
            session, tenant_id=tenant, base_model=base.name, budget=10**5, task_names=["ranked"]
        )
        shared_id = publish_shared_diff(
            session, world.store, run_id=run.id, data=dumps_artifact(shared)
        )
        version = publish_consolidated_version(
            session,
            world.store,
            task_id=task.id,
            residual_bytes=dumps_artifact(residual),
            shared_artifact_id=shared_id,
            nnz=residual.nnz + shared.nnz,
            density=0.0,
            metrics={},
            config={"stored_entries": residual.nnz, "shared_stored_entries": shared.nnz},
            consolidation_run_id=run.id,
        )
    assert version.number == 3
    return {
        "world": world,
        "composed": dumps_artifact(compose_diffs(shared, residual)),
        "shared": dumps_artifact(shared),
        "residual": dumps_artifact(residual),
        "version": version,
    }


def test_a_new_layout_version_stores_only_its_residual(served):
    version = served["version"]
    assert version.artifact_id == version.residual_artifact_id
    assert version.artifact.kind == "residual-diff"
    assert version.artifact.sha256 == hashlib.sha256(served["residual"]).hexdigest()
    assert version.shared_artifact.sha256 == hashlib.sha256(served["shared"]).hexdigest()


def test_downloading_a_new_layout_version_returns_the_composed_diff(served):
    world, composed = served["world"], served["composed"]
    headers = world.headers("reader")
    response = world.client.get("/v1/tasks/ranked/diff", headers=headers)
    assert response.status_code == 200, response.text
    assert response.content == composed  # shared + residual, built on request
    sha = hashlib.sha256(composed).hexdigest()
    assert response.headers["X-Diffbank-Sha256"] == sha and response.headers["ETag"] == f'"{sha}"'
    assert int(response.headers["Content-Length"]) == len(composed)
    again = world.client.get("/v1/tasks/ranked/diff?version=3", headers=headers)
    assert again.content == composed and again.headers["ETag"] == response.headers["ETag"]
    cached = world.client.get(
        "/v1/tasks/ranked/diff", headers={**headers, "If-None-Match": response.headers["ETag"]}
    )
    assert cached.status_code == 304
    ranged = world.client.get("/v1/tasks/ranked/diff", headers={**headers, "Range": "bytes=8-99"})
    assert ranged.status_code == 206 and ranged.content == composed[8:100]
    assert ranged.headers["Content-Range"] == f"bytes 8-99/{len(composed)}"


def test_the_listing_gives_each_version_the_sha256_and_size_its_download_returns(served):
    world = served["world"]
    headers = world.headers("reader")
    items = world.client.get("/v1/tasks/ranked/versions", headers=headers).json()["items"]
    assert [item["number"] for item in items] == [1, 2, 3]
    for item in items:
        number = item["number"]
        download = world.client.get(f"/v1/tasks/ranked/diff?version={number}", headers=headers)
        assert download.status_code == 200, download.text
        assert download.headers["ETag"] == f'"{item["sha256"]}"'
        assert int(download.headers["Content-Length"]) == item["size_bytes"]
        assert len(download.content) == item["size_bytes"]
        assert hashlib.sha256(download.content).hexdigest() == item["sha256"]
    composed = served["composed"]  # version 3 is composed on request: not its residual's digest
    assert items[2]["sha256"] == hashlib.sha256(composed).hexdigest()
    assert items[2]["size_bytes"] == len(composed) != len(served["residual"])


def _publish_composed_on_request(served, base, *, seed: int, config: dict):
    """A version of `ranked` composed on request from the run's shared diff and a new residual
    (not activated), published with `config` as given: the residual's bytes and the row."""
    from registry import catalog
    from registry.publish import ARTIFACTS_KIND, DIFF_SUFFIX, upload_verified

    world, version = served["world"], served["version"]
    data = dumps_artifact(factored_diff(base, seed=seed, rank=1))
    residual = upload_verified(world.store, data, kind=ARTIFACTS_KIND, suffix=DIFF_SUFFIX)
    with world.session_factory() as session:
        row = catalog.publish_task_version(
            session,
            task_id=version.task_id,
            diff=residual,
            nnz=1,
            density=0.0,
            metrics={},
            config=config,
            shared_artifact_id=version.shared_artifact_id,
            consolidation_run_id=version.consolidation_run_id,
            composed_on_request=True,
            activate=False,
        )
    return data, row


def test_a_version_composed_on_request_before_digests_were_recorded_lists_none_and_downloads(
    served, base
):
    from api.routes.tasks import COMPOSED

    world = served["world"]
    residual, row = _publish_composed_on_request(served, base, seed=25, config={})
    headers = world.headers("reader")
    listed = world.client.get("/v1/tasks/ranked/versions", headers=headers).json()["items"]
    assert [(v["sha256"], v["size_bytes"]) for v in listed if v["number"] == row.number] == [
        (None, None)
    ]
    composed = dumps_artifact(
        compose_diffs(loads_artifact(served["shared"]), loads_artifact(residual))
    )
    download = world.client.get(f"/v1/tasks/ranked/diff?version={row.number}", headers=headers)
    assert download.status_code == 200 and download.content == composed
    assert download.headers["ETag"] == f'"{hashlib.sha256(composed).hexdigest()}"'
    parts = (served["version"].shared_artifact.sha256, hashlib.sha256(residual).hexdigest())
    assert COMPOSED.get(parts) == composed  # ranges and repeats reuse it


def test_stats_of_a_composed_version_compose_it_once_into_the_download_cache(served, base):
    from api.routes.tasks import COMPOSED

    world = served["world"]
    residual, row = _publish_composed_on_request(served, base, seed=27, config={})
    parts = (served["version"].shared_artifact.sha256, hashlib.sha256(residual).hexdigest())
    assert COMPOSED.get(parts) is None
    headers = world.headers("reader")
    stats = world.client.get(f"/v1/tasks/ranked/stats?version={row.number}", headers=headers)
    composed = compose_diffs(loads_artifact(served["shared"]), loads_artifact(residual))
    assert stats.status_code == 200 and stats.json()["nnz"] == composed.nnz
    assert COMPOSED.get(parts) == dumps_artifact(composed)  # the download reuses these bytes


def test_a_composed_version_answers_304_from_its_recorded_digest_and_refuses_other_bytes(
    served, base
):
    world = served["world"]
    recorded = {"composed_sha256": "ab" * 32, "composed_size_bytes": 123}
    _, row = _publish_composed_on_request(served, base, seed=26, config=recorded)
    headers = world.headers("reader")
    url = f"/v1/tasks/ranked/diff?version={row.number}"
    # the ETag is the recorded digest: a 304 needs no composing (which would not match it)
    cached = world.client.get(url, headers={**headers, "If-None-Match": f'"{"ab" * 32}"'})
    assert cached.status_code == 304 and cached.headers["ETag"] == f'"{"ab" * 32}"'
    body = world.client.get(url, headers=headers)
    assert body.status_code == 409, body.text
    assert body.json()["error"]["code"] == "artifact_mismatch"
    assert "were recorded" in body.json()["error"]["message"]


def test_a_cached_composition_is_still_checked_against_each_versions_recorded_digest(served, base):
    world = served["world"]
    headers = world.headers("reader")
    _, first = _publish_composed_on_request(served, base, seed=28, config={})
    warm = world.client.get(f"/v1/tasks/ranked/diff?version={first.number}", headers=headers)
    assert warm.status_code == 200  # the parts' composition is now cached
    wrong = {"composed_sha256": "cd" * 32, "composed_size_bytes": 7}
    _, second = _publish_composed_on_request(served, base, seed=28, config=wrong)  # same parts
    body = world.client.get(f"/v1/tasks/ranked/diff?version={second.number}", headers=headers)
    assert body.status_code == 409 and "were recorded" in body.json()["error"]["message"]


def test_the_composed_cache_keeps_the_most_recently_used_within_its_bytes():
    from registry.layouts import ComposedCache

    cache = ComposedCache(max_bytes=10)
    cache.put(("s", "a"), b"aaaa")
    cache.put(("s", "b"), b"bbbb")
    assert cache.get(("s", "a")) == b"aaaa"  # now the most recently used
    cache.put(("s", "c"), b"cccc")  # 12 bytes: the least recently used (b) goes
    assert cache.get(("s", "b")) is None
    assert (cache.get(("s", "a")), cache.get(("s", "c"))) == (b"aaaa", b"cccc")
    cache.put(("s", "d"), b"d" * 11)  # larger than the whole cache: not kept, nothing dropped
    assert cache.get(("s", "d")) is None and len(cache) == 2 and cache.nbytes == 8


def test_the_parts_of_a_new_layout_version_are_its_stored_shared_and_residual(served):
    world = served["world"]
    headers = world.headers("reader")
    listing = world.client.get("/v1/tasks/ranked/versions/3/parts", headers=headers).json()
    assert listing["composed_sha256"] == hashlib.sha256(served["composed"]).hexdigest()
    assert (
        world.client.get("/v1/tasks/ranked/diff?layout=factored", headers=headers).json() == listing
    )
    for part in listing["parts"]:
        download = world.client.get(part["url"], headers=headers)
        assert download.status_code == 200 and download.content == served[part["role"]]
        assert download.headers["X-Diffbank-Sha256"] == part["sha256"]
    stats = world.client.get("/v1/tasks/ranked/stats", headers=headers).json()
    assert stats["nnz"] == loads_artifact(served["composed"]).nnz


def test_predictions_of_a_new_layout_version_equal_its_composed_diff(served, tiny_base_dir):
    world = served["world"]
    texts = ["a fine day", "rain again"]
    response = world.client.post(
        "/v1/tasks/ranked/predict", headers=world.headers("admin"), json={"inputs": texts}
    )
    assert response.status_code == 200, response.text
    merged = world.app.state.predictor.predict_artifact(
        served["composed"], texts, base=str(tiny_base_dir)
    )
    for got, want in zip(response.json()["predictions"], merged, strict=True):
        assert got["label"] == want["label"] and abs(got["score"] - want["score"]) < 1e-5


def test_pull_then_export_gives_the_model_of_the_composed_diff(
    served, tiny_base_dir, base, tmp_path, monkeypatch, capsys
):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForSequenceClassification

    import cli.client as command
    from cli import main
    from cli.http_client import DiffbankClient

    world = served["world"]
    monkeypatch.setattr(
        command,
        "client_from_args",
        lambda args: DiffbankClient("http://testserver", args.key, http=TestClient(world.app)),
    )
    pulled = tmp_path / "ranked.safetensors"
    argv = ["pull", "ranked", "--output", str(pulled), "--key", world.keys["reader"]]
    assert main(argv) == 0
    assert pulled.read_bytes() == served["composed"]
    out = tmp_path / "model"
    assert main(["export", str(pulled), str(out), "--base", str(tiny_base_dir)]) == 0
    capsys.readouterr()
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    expected = build_task_model(base, loads_artifact(served["composed"]))
    inputs = base.tokenizer(["a fine day", "rain"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, expected(**inputs).logits)


def test_deleting_a_new_layout_version_keeps_the_shared_blob_of_its_run(served):
    from registry import catalog
    from registry.gc import gc

    world, version = served["world"], served["version"]
    shared_key, residual_key = version.shared_artifact.object_key, version.artifact.object_key
    with world.session_factory() as session:
        report = gc(session, world.store, grace_s=0.0)
    assert not {shared_key, residual_key} & set(report.deleted_blobs)
    with world.session_factory() as session:
        catalog.delete_task_version(
            session, world.store, tenant_id=world.tenant_ids["admin"], name="ranked", number=3
        )
    assert world.store.head(residual_key) is None
    assert world.store.head(shared_key) is not None  # the run still references it
