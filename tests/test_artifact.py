"""The sparse-diff artifact: round trip, validation of bad files, apply and bit-exact revert."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffs.apply import apply_diff, build_task_model
from diffs.basemodel import LoadedBase, base_fingerprint, build_model, load_base
from diffs.build import diff_from_dense
from diffs.checks import all_finite
from diffs.container import pack_file
from diffs.diffstats import layer_module_of, nonzeros_per_layer
from diffs.index_coding import low_bit_width, pack_fields
from diffs.read import load_artifact, loads_artifact
from diffs.types import (
    INDEX_HIGH_KEY,
    INDEX_LOW_KEY,
    VALUES_KEY,
    ArtifactError,
    ArtifactMeta,
    SparseDiff,
)
from diffs.write import dumps_artifact, save_artifact
from tests.fixtures.models import make_tiny_bert


def random_diff(
    base: LoadedBase,
    *,
    density: float = 0.01,
    seed: int = 0,
    value_dtype: str = "float16",
    scale: float = 1e-2,
    task_type: str = "classification",
) -> SparseDiff:
    """A diff with a random global mask of the given density, random values and a real head."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(base.encoder.named_parameters())
    k = round(density * base.n_params)
    flat = torch.zeros(base.n_params)
    positions = torch.randperm(base.n_params, generator=generator)[:k]
    flat[positions] = torch.randn(k, generator=generator) * scale
    flat[positions[flat[positions] == 0]] = scale  # keep exactly k nonzeros
    deltas, offset = {}, 0
    for name, param in params.items():
        deltas[name] = flat[offset : offset + param.numel()].view(param.shape)
        offset += param.numel()
    labels = [] if task_type == "regression" else ["negative", "positive"]
    torch.manual_seed(seed)
    model = build_model(
        base, task_type=task_type, num_labels=len(labels) or 1, label_names=labels or None
    )
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("class")}
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type=task_type,
        label_names=labels,
        config={"density": density, "seed": seed},
        metrics={"accuracy": 0.5},
        extra={"lineage": {"job": 7}},
    )
    return diff_from_dense(deltas, head, meta, value_dtype)


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir) -> LoadedBase:
    return load_base(str(tiny_base_dir))


@pytest.fixture(scope="module")
def tiny_diff(tiny_base) -> SparseDiff:
    return random_diff(tiny_base, density=0.01, seed=1)


def assert_same_diff(a: SparseDiff, b: SparseDiff) -> None:
    """Two diffs hold the same tensors, bit for bit, and the same metadata."""
    assert a.meta == b.meta
    assert a.shapes == b.shapes
    assert sorted(a.indices) == sorted(b.indices)
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name])
        assert a.values[name].dtype == b.values[name].dtype
        assert torch.equal(a.values[name].view(torch.uint8), b.values[name].view(torch.uint8))
    assert sorted(a.head) == sorted(b.head)
    for name in a.head:
        assert torch.equal(a.head[name], b.head[name])


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
def test_artifact_round_trips_every_value_dtype(tiny_base, value_dtype, tmp_path):
    diff = random_diff(tiny_base, density=0.005, seed=2, value_dtype=value_dtype)
    path = tmp_path / "task.safetensors"
    size = save_artifact(diff, path)
    assert size == path.stat().st_size
    loaded = load_artifact(
        path, expected_fingerprint=tiny_base.fingerprint, base_shapes=tiny_base.shapes
    )
    assert_same_diff(diff, loaded)
    assert loaded.meta.value_dtype == value_dtype
    assert loaded.meta.nnz == loaded.nnz == round(0.005 * tiny_base.n_params)
    assert loaded.meta.density == pytest.approx(loaded.nnz / tiny_base.n_params)


def test_regression_diff_and_an_empty_diff_round_trip(tiny_base):
    regression = random_diff(tiny_base, density=0.001, task_type="regression")
    assert_same_diff(regression, loads_artifact(dumps_artifact(regression)))
    empty = random_diff(tiny_base, density=0.0)
    loaded = loads_artifact(dumps_artifact(empty), base_shapes=tiny_base.shapes)
    assert loaded.nnz == 0 and loaded.indices == {}
    assert_same_diff(empty, loaded)


def test_artifact_is_compact_and_stores_only_tensors_with_nonzeros(tiny_base):
    diff = random_diff(tiny_base, density=0.005, seed=3)
    data = dumps_artifact(diff)
    head_bytes = sum(t.numel() * t.element_size() for t in diff.head.values())
    # fp16 values take 2 bytes; the indices well under 2 bytes, plus a small header.
    assert (len(data) - head_bytes) / diff.nnz < 4.0
    assert len(data) < 6 * diff.nnz  # int32 indices + fp16 values would take 6 bytes/nnz
    sparse = diff_from_dense(
        {
            "pooler.dense.bias": torch.eye(1, 32)[0] * 0.5,
            "pooler.dense.weight": torch.zeros(32, 32),
        },
        diff.head,
        diff.meta,
    )
    assert list(loads_artifact(dumps_artifact(sparse)).indices) == ["pooler.dense.bias"]


def test_writer_refuses_unsorted_duplicate_or_out_of_range_indices(tiny_diff):
    name = next(iter(tiny_diff.indices))
    shape = tiny_diff.shapes[name]
    bad_sets = {
        "sorted and unique": torch.tensor([5, 3], dtype=torch.int64),
        "out of bounds": torch.tensor([0, int(np.prod(shape))], dtype=torch.int64),
    }
    for message, indices in bad_sets.items():
        bad = dataclasses.replace(
            tiny_diff,
            indices={name: indices},
            values={name: torch.ones(2, dtype=torch.float16)},
            meta=dataclasses.replace(tiny_diff.meta, nnz=2),
        )
        with pytest.raises(ArtifactError, match=message):
            dumps_artifact(bad)
    nan = dataclasses.replace(
        tiny_diff, values={n: v.clone().fill_(float("nan")) for n, v in tiny_diff.values.items()}
    )
    with pytest.raises(ArtifactError, match="NaN"):
        dumps_artifact(nan)


# ---------------------------------------------------------------- bad files


def split_file(data: bytes) -> tuple[dict, int]:
    """The JSON header of a safetensors blob and where its data starts."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), 8 + length


def with_header(data: bytes, header: dict) -> bytes:
    """The same data section under a new header (no digest update)."""
    _, start = split_file(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[start:]


def repack(
    diff: SparseDiff,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    global_indices: list[int] | None = None,
) -> bytes:
    """Rebuild a diff's file with some tensors / metadata replaced, correctly checksummed."""
    from safetensors.torch import load

    data = dumps_artifact(diff)
    header, _ = split_file(data)
    contents = load(data)
    meta = dict(header["__metadata__"])
    del meta["sha256"]
    if global_indices is not None:
        layout = json.loads(meta["layout"])
        universe = sum(int(np.prod(shape)) for _, shape, _ in layout)
        values = np.array(global_indices, dtype=np.int64)
        low_bits = low_bit_width(len(values), universe)
        coded = pack_fields(values >> low_bits, values & ((1 << low_bits) - 1), low_bits, universe)
        contents[INDEX_LOW_KEY] = torch.from_numpy(coded.low)
        contents[INDEX_HIGH_KEY] = torch.from_numpy(coded.high)
    contents.update(tensors or {})
    meta.update(metadata or {})
    return pack_file(contents, meta)


def two_entry_diff(tiny_base: LoadedBase) -> SparseDiff:
    """A diff of exactly two nonzeros in one tensor, to craft index streams by hand."""
    delta = torch.zeros(32)
    delta[[3, 9]] = 0.25
    base = random_diff(tiny_base, density=0.0)
    return diff_from_dense({"pooler.dense.bias": delta}, base.head, base.meta)


def bad_files(tiny_base: LoadedBase, diff: SparseDiff) -> dict[str, tuple[bytes, str]]:
    """Each way an artifact can be broken, with the words the error must contain."""
    good = dumps_artifact(diff)
    header, data_start = split_file(good)
    meta = json.loads(header["__metadata__"]["meta"])
    pair = two_entry_diff(tiny_base)

    flipped_value = bytearray(good)
    values_start = data_start + header[VALUES_KEY]["data_offsets"][0]
    flipped_value[values_start + 1] ^= 0x01

    relabelled = json.loads(json.dumps(header))
    relabelled["__metadata__"]["meta"] = json.dumps(dict(meta, label_names=["neg", "pos"]))
    widened = json.loads(json.dumps(header))
    widened[VALUES_KEY]["dtype"] = "BF16"

    broken_json = bytearray(good)
    broken_json[8] = ord("[")
    raw_header = b"{\n" + good[9:data_start].rstrip(b" ")  # JSON-equivalent whitespace
    raw_header += b" " * (-len(raw_header) % 8)
    respaced = struct.pack("<Q", len(raw_header)) + raw_header + good[data_start:]

    return {
        "truncated to half": (good[: len(good) // 2], "truncated"),
        "truncated by one byte": (good[:-1], "truncated"),
        "only five bytes": (good[:5], "truncated"),
        "empty": (b"", "truncated"),
        "tampered value byte": (bytes(flipped_value), "checksum mismatch"),
        "tampered label names in header": (with_header(good, relabelled), "checksum mismatch"),
        "tampered tensor dtype in header": (with_header(good, widened), "checksum mismatch"),
        "bad header JSON": (bytes(broken_json), "bad header JSON"),
        "whitespace changed in header": (bytes(respaced), "checksum mismatch"),
        "not an artifact": (pack_file({"x": torch.zeros(2)}, {"format": "other"}), "format"),
        "wrong format version": (repack(diff, metadata={"format_version": "2"}), "format version"),
        "bad meta JSON": (repack(diff, metadata={"meta": "{not json"}), "bad JSON in metadata"),
        "meta field of wrong type": (
            repack(diff, metadata={"meta": json.dumps(dict(meta, nnz="many"))}),
            "'nnz'",
        ),
        "unknown meta field": (
            repack(diff, metadata={"meta": json.dumps(dict(meta, surprise=1))}),
            "surprise",
        ),
        "out-of-bounds index": (repack(pair, global_indices=[3, 40]), "out of bounds"),
        "unsorted indices": (repack(pair, global_indices=[9, 3]), "strictly increasing"),
        "duplicate indices": (repack(pair, global_indices=[9, 9]), "strictly increasing"),
        "values of the wrong dtype": (
            repack(diff, tensors={VALUES_KEY: torch.zeros(diff.nnz, dtype=torch.float32)}),
            "dtype float32",
        ),
        "index stream of the wrong dtype": (
            repack(diff, tensors={INDEX_LOW_KEY: torch.zeros(3, dtype=torch.int32)}),
            "uint8",
        ),
        "one value missing": (
            repack(diff, tensors={VALUES_KEY: torch.zeros(diff.nnz - 1, dtype=torch.float16)}),
            "values tensor has shape",
        ),
        "NaN value": (
            repack(diff, tensors={VALUES_KEY: torch.full((diff.nnz,), float("nan")).half()}),
            "NaN",
        ),
        "layout count disagrees with the stream": (
            repack(
                pair,
                metadata={"layout": json.dumps([["pooler.dense.bias", [32], 1], ["z", [4], 1]])},
            ),
            "layout says",
        ),
        "nnz in meta disagrees": (
            repack(diff, metadata={"meta": json.dumps(dict(meta, nnz=meta["nnz"] + 1))}),
            "meta.nnz",
        ),
        "density in meta disagrees": (
            repack(diff, metadata={"meta": json.dumps(dict(meta, density=0.5))}),
            "meta.density",
        ),
        "unexpected tensor": (repack(diff, tensors={"sneaky": torch.zeros(1)}), "unexpected"),
    }


BAD_FILE_CASES = [
    "truncated to half",
    "truncated by one byte",
    "only five bytes",
    "empty",
    "tampered value byte",
    "tampered label names in header",
    "tampered tensor dtype in header",
    "bad header JSON",
    "whitespace changed in header",
    "not an artifact",
    "wrong format version",
    "bad meta JSON",
    "meta field of wrong type",
    "unknown meta field",
    "out-of-bounds index",
    "unsorted indices",
    "duplicate indices",
    "values of the wrong dtype",
    "index stream of the wrong dtype",
    "one value missing",
    "NaN value",
    "layout count disagrees with the stream",
    "nnz in meta disagrees",
    "density in meta disagrees",
    "unexpected tensor",
]


@pytest.fixture(scope="module")
def broken(tiny_base, tiny_diff) -> dict[str, tuple[bytes, str]]:
    return bad_files(tiny_base, tiny_diff)


@pytest.mark.parametrize("case", BAD_FILE_CASES)
def test_reading_a_broken_artifact_fails_with_an_error_naming_the_problem(broken, case):
    data, words = broken[case]
    with pytest.raises(ArtifactError, match=words):
        loads_artifact(data)


def test_every_bad_file_case_is_tested(broken):
    assert sorted(broken) == sorted(BAD_FILE_CASES)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_corruption_of_the_bytes_is_an_artifact_error(data, small_artifact):
    mutation = data.draw(st.sampled_from(["flip", "cut", "insert", "overwrite"]))
    blob = bytearray(small_artifact)
    at = data.draw(st.integers(0, len(blob) - 1))
    if mutation == "flip":
        blob[at] ^= data.draw(st.integers(1, 255))
    elif mutation == "cut":
        del blob[at:]
    elif mutation == "insert":
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=32))
        if bytes(blob[at : at + len(chunk)]) == chunk[: len(blob) - at]:
            return
        blob[at : at + len(chunk)] = chunk
    with pytest.raises(ArtifactError):
        loads_artifact(bytes(blob))


@pytest.fixture(scope="module")
def small_artifact(tiny_base) -> bytes:
    return dumps_artifact(random_diff(tiny_base, density=1e-5, seed=3))


def test_artifact_for_another_base_is_rejected(tiny_base, tiny_diff, tmp_path):
    other = load_base(str(make_tiny_bert(tmp_path / "other-base", seed=5)))
    data = dumps_artifact(tiny_diff)
    with pytest.raises(ArtifactError, match="wrong base"):
        loads_artifact(data, expected_fingerprint=other.fingerprint, base_shapes=other.shapes)
    with pytest.raises(ArtifactError, match="wrong base"):
        build_task_model(other, tiny_diff)


def test_artifact_whose_shapes_do_not_fit_the_base_is_rejected(tiny_base, tiny_diff):
    data = dumps_artifact(tiny_diff)
    shapes = dict(tiny_base.shapes)
    shapes["pooler.dense.weight"] = (16, 64)
    with pytest.raises(ArtifactError, match="shape of 'pooler.dense.weight'"):
        loads_artifact(data, base_shapes=shapes)
    del shapes["pooler.dense.weight"]
    with pytest.raises(ArtifactError, match="does not exist in the base"):
        loads_artifact(data, base_shapes=shapes)


def test_missing_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="cannot read artifact"):
        load_artifact(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- apply and revert


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.0, 1e-5, 1e-3, 0.02, 0.2]),
    value_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    scale=st.sampled_from([1e-8, 1e-3, 1.0, 1e3]),
)
def test_apply_adds_the_diff_and_revert_restores_the_base_bit_for_bit(
    tiny_base, seed, density, value_dtype, scale
):
    diff = loads_artifact(
        dumps_artifact(
            random_diff(tiny_base, density=density, seed=seed, value_dtype=value_dtype, scale=scale)
        )
    )
    model = build_model(tiny_base, task_type="classification", num_labels=2)
    encoder = model.base_model
    params = dict(encoder.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}

    applied = apply_diff(encoder, diff)
    for name, param in params.items():
        expected = before[name].clone().view(-1)
        if name in diff.indices:
            idx = diff.indices[name]
            expected[idx] = expected[idx] + diff.values[name].to(expected.dtype)
        assert torch.equal(param.detach().view(-1), expected), name
    applied.revert()
    assert base_fingerprint(encoder) == tiny_base.fingerprint
    applied.revert()  # idempotent
    assert base_fingerprint(encoder) == tiny_base.fingerprint


def test_stacked_diffs_revert_in_reverse_order_to_the_exact_base(tiny_base):
    model = build_model(tiny_base, task_type="classification", num_labels=2)
    first = random_diff(tiny_base, density=0.05, seed=10)
    second = random_diff(tiny_base, density=0.05, seed=11)
    with apply_diff(model.base_model, first), apply_diff(model.base_model, second):
        assert base_fingerprint(model.base_model) != tiny_base.fingerprint
    assert base_fingerprint(model.base_model) == tiny_base.fingerprint
    once = apply_diff(model.base_model, first)
    twice = apply_diff(model.base_model, first)  # the same diff again: its own saved values
    name = next(iter(first.indices))
    param = dict(model.base_model.named_parameters())[name].detach().view(-1)
    base_values = dict(tiny_base.encoder.named_parameters())[name].detach().view(-1)
    idx, delta = first.indices[name], first.values[name].float()
    assert torch.equal(param[idx], (base_values[idx] + delta) + delta)
    twice.revert()
    once.revert()
    assert base_fingerprint(model.base_model) == tiny_base.fingerprint


def test_apply_refuses_a_diff_for_other_tensors_before_touching_anything(tiny_base, tiny_diff):
    model = build_model(tiny_base, task_type="classification", num_labels=2)
    bad = dataclasses.replace(
        tiny_diff,
        indices=dict(tiny_diff.indices, **{"no.such.weight": torch.tensor([0])}),
        values=dict(tiny_diff.values, **{"no.such.weight": torch.ones(1).half()}),
        shapes=dict(tiny_diff.shapes, **{"no.such.weight": (1,)}),
    )
    with pytest.raises(ArtifactError, match="no.such.weight"):
        apply_diff(model.base_model, bad)
    assert base_fingerprint(model.base_model) == tiny_base.fingerprint


def test_task_model_merges_diff_and_head_and_predicts_like_apply(tiny_base, tiny_diff):
    merged = build_task_model(tiny_base, tiny_diff)
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    shared = build_model(tiny_base, task_type="classification", num_labels=2)
    shared.classifier.load_state_dict(
        {k.removeprefix("classifier."): v for k, v in tiny_diff.head.items()}
    )
    shared.eval()
    inputs = tiny_base.tokenizer(["a fine day", "rain again"], return_tensors="pt", padding=True)
    with torch.no_grad(), apply_diff(shared.base_model, tiny_diff):
        expected = shared(**inputs).logits
    with torch.no_grad():
        assert torch.equal(merged(**inputs).logits, expected)


# ---------------------------------------------------------------- statistics


def test_nonzeros_are_counted_per_layer(tiny_diff):
    counts = nonzeros_per_layer(tiny_diff)
    assert set(counts) <= {"embeddings", "layer 0", "layer 1", "pooler"}
    assert sum(counts.values()) == tiny_diff.nnz
    assert layer_module_of("encoder.layer.11.attention.self.query.weight") == (
        "layer 11",
        "attention.self.query",
    )
    assert layer_module_of("embeddings.word_embeddings.weight") == ("embeddings", "word_embeddings")
    assert layer_module_of("pooler.dense.bias") == ("pooler", "dense")


def test_apply_follows_a_parameter_whose_storage_was_replaced(tiny_base, tiny_diff):
    model = build_model(tiny_base, task_type="classification", num_labels=2)
    apply_diff(model.base_model, tiny_diff).revert()  # caches the targets for this encoder
    name = "embeddings.word_embeddings.weight"
    param = dict(model.base_model.named_parameters())[name]
    param.data = param.data.clone()  # e.g. a reload: the cached view is now stale
    idx = tiny_diff.indices[name]
    with apply_diff(model.base_model, tiny_diff):
        changed = param.detach().view(-1)[idx]
        expected = dict(tiny_base.encoder.named_parameters())[name]
        expected = expected.detach().view(-1)[idx] + tiny_diff.values[name].float()
        assert torch.equal(changed, expected)
    assert base_fingerprint(model.base_model) == tiny_base.fingerprint


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_values_are_found_in_every_float_dtype(dtype):
    values = torch.tensor([0.0, -1.5, 3e-3, torch.finfo(dtype).max], dtype=dtype)
    assert all_finite(values) and all_finite(values[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        spoiled = values.clone()
        spoiled[2] = bad
        assert not all_finite(spoiled)
