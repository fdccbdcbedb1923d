"""Serving kernels against the reference: every module of a mixed forward equals the oracle's
output row by row, and every request's logits equal the oracle's and its merged model's, for
the compiled (C++) and Triton kernels; a kernel asked for by name that cannot run is an error.

Without CUDA the Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors. The variable must
be set before the kernels are defined, and it would switch Triton to the interpreter for every
other test of the session, so the Triton cases run in a child pytest of this file alone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffs.apply import build_task_model
from diffs.basemodel import load_base
from diffs.compose import compose_diffs
from diffs.read import loads_artifact
from diffs.write import dumps_artifact
from serving.engine import Predictor
from serving.kernels import KernelUnavailableError, oracle, select_kernel
from serving.kernels.plan import FACTOR, plan_batch
from serving.mixed import Segment
from serving.resident import DecodedDiff, LeafPacker, ModuleDelta
from tests.api_support import dense_artifact, random_artifact, random_deltas
from tests.test_consolidation_storage import factored_diff

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
BASE_DIR_VARIABLE = "SERVING_KERNELS_TEST_BASE_DIR"
TEXTS = ["a wonderful, warm film", "dull and far too long for anyone", "wow"]
PAIRS = [["it rains", "the street is wet"], ["it is sunny today", "it rains"]]
# fp32: x·Wᵀ + x·Δᵀ rounds differently from x·(W+Δ)ᵀ and atomic adds land in any order, so
# outputs agree to 1e-5 absolute plus 1e-5 relative; a little more room for fp16 values.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-5}
LOOSE = max(TOLERANCE.values())
UNCHANGED = 1e-6  # rows without a diff: the base's rows (BLAS may block other row counts apart)

triton_runs_here = pytest.mark.skipif(
    not (CUDA or INTERPRETED),
    reason="no CUDA: the child process of test_interpreted_triton_in_a_child_process runs it",
)
KERNELS = ["compiled", pytest.param("triton", marks=triton_runs_here)]


def _device(kernel: str) -> str:
    return "cuda" if kernel == "triton" and CUDA and not INTERPRETED else "cpu"


def _head(base, seed: int, labels: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = base.config.hidden_size
    return {
        "classifier.weight": torch.randn(labels, hidden, generator=generator),
        "classifier.bias": torch.randn(labels, generator=generator),
    }


@pytest.fixture(scope="module")
def base_dir(request) -> Path:
    """The tiny base model's directory: the parent's in the child process (building one takes
    seconds)."""
    given = os.environ.get(BASE_DIR_VARIABLE)
    return Path(given) if given else request.getfixturevalue("tiny_base_dir")


@pytest.fixture(scope="module")
def base(base_dir):
    return load_base(str(base_dir))


@pytest.fixture(scope="module")
def tasks(base_dir, base):
    """Artifacts: the three task types (fp16 values), an fp32 task, a shared diff with a sparse
    residual and with a low-rank factored residual, and the composed diffs of those pairs."""
    made = {
        "sentiment": random_artifact(
            base_dir, seed=1, task_type="classification", labels=("n", "p"), density=0.05
        ),
        "entail": random_artifact(
            base_dir,
            seed=3,
            task_type="pair-classification",
            labels=("no", "yes"),
            density=0.05,
        ),
        "rating": random_artifact(
            base_dir, seed=4, task_type="regression", labels=(), density=0.05
        ),
        "topic": dense_artifact(
            base,
            random_deltas(base, seed=5, density=0.05),
            _head(base, 5, 3),
            labels=("a", "b", "c"),
        ),
    }
    shared = random_deltas(base, seed=10, density=0.05)
    made["shared"] = dense_artifact(base, shared, {})
    residual = random_deltas(base, seed=11, density=0.02)
    head = _head(base, 11, 2)
    made["residual"] = dense_artifact(base, residual, head)
    made["residual-composed"] = dense_artifact(
        base, {n: shared[n] + residual[n] for n in residual}, head
    )
    factored = factored_diff(base, seed=12, rank=2, value_dtype="float32")
    made["factored"] = dumps_artifact(factored)
    made["factored-composed"] = dumps_artifact(
        compose_diffs(loads_artifact(made["shared"]), factored)
    )
    return made


@pytest.fixture(scope="module")
def merged(base, tasks):
    """Logits of a task's standalone merged model on some inputs (memoised)."""
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def logits(name: str, inputs) -> torch.Tensor:
        key = (name, repr(inputs))
        if key not in cache:
            diff = loads_artifact(tasks[name])
            model = build_task_model(base, diff)
            if not isinstance(inputs[0], str):
                texts, pairs = [p[0] for p in inputs], [p[1] for p in inputs]
            else:
                texts, pairs = list(inputs), None
            encoded = base.encode(texts, pairs, max_length=diff.meta.max_length)
            with torch.no_grad():
                cache[key] = model(**encoded).logits
        return cache[key]

    return logits


def _resident(predictor, base_dir, tasks, name):
    return predictor.resolve(str(base_dir), name, lambda: tasks[name])


def _close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    torch.testing.assert_close(
        got, expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}: {m}"
    )


class Checked:
    """A kernel's run that also runs the oracle on the same input and compares every row
    interval of the module's output (each at its diffs' value dtype's tolerance)."""

    def __init__(self, run) -> None:
        self.run = run
        self.seen: list[tuple[str, str, bool, bool]] = []

    def __call__(self, name, module, x, plan, forward):
        expected = oracle.run(name, module, x, plan, forward)
        got = self.run(name, module, x, plan, forward)
        parts = plan.parts(name)
        assert got.shape == expected.shape and got.shape[0] == plan.rows, name
        for start, stop, diffs in plan.intervals:
            dtypes = {d.values.dtype for d in diffs if d.modules.get(name) is not None}
            tolerance = max((TOLERANCE[t] for t in dtypes), default=UNCHANGED)
            _close(got[start:stop], expected[start:stop], tolerance, f"{name} rows {start}:{stop}")
        factors = bool((parts[:, FACTOR] >= 0).any())
        self.seen.append((name, type(module).__name__, x.shape[0] != plan.rows, factors))
        return got


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_module_of_a_mixed_forward_equals_the_oracle_row_by_row(
    kernel, base_dir, tasks, one_torch_thread
):
    predictor = Predictor(kernel=kernel, device=_device(kernel))
    held = predictor.base(str(base_dir))
    mixed = held.mixed
    assert mixed.kernel == kernel
    d = {
        name: _resident(predictor, base_dir, tasks, name).decoded
        for name in ("sentiment", "topic", "shared", "residual", "factored", "entail")
    }
    texts = [*TEXTS, "one", "two more words", "and three", "x", "y y y y y y y y y y", "z"]
    encoded = {
        k: v.to(_device(kernel)) for k, v in held.loaded.encode(texts, None, max_length=32).items()
    }
    segments = [
        Segment(d["sentiment"], 0, 2),  # fp16 values; rows 2:3 have no diff
        Segment(d["topic"], 3, 4),  # fp32 values
        Segment(d["shared"], 4, 8),  # consolidated: shared + sparse residual ...
        Segment(d["residual"], 4, 6),
        Segment(d["factored"], 6, 8),  # ... and shared + residual with low-rank factors
        Segment(d["entail"], 8, 9),
    ]
    checked = Checked(mixed._run)
    run, mixed._run = mixed._run, checked
    try:
        out = mixed.forward(encoded, segments).last_hidden_state
    finally:
        mixed._run = run
    kinds = {(kind, broadcast) for _, kind, broadcast, _ in checked.seen}
    assert {("Linear", False), ("LayerNorm", False), ("Embedding", False)} <= kinds
    assert ("embeddings.position_embeddings", "Embedding", True, False) in checked.seen
    assert any(factors for *_, factors in checked.seen)
    # a row without a diff is the base's row; rows with one were changed
    pristine = mixed.forward(encoded, []).last_hidden_state
    _close(out[2:3], pristine[2:3], UNCHANGED, "row without a diff")
    assert float((out[:2] - pristine[:2]).abs().max()) > 1e-2


def _synthetic_diff(modules, *, seed: int, dtype: torch.dtype, factors: bool, device: str):
    """A random resident diff of every parameter of `modules` (5% of positions, 1% of a linear
    weight's), with rank-2 factors on the linear weights if `factors`."""
    generator = torch.Generator().manual_seed(seed)
    packer = LeafPacker(dtype)
    deltas = {}
    for name, module in modules.items():
        delta = deltas[name] = ModuleDelta()
        for leaf, param in module.named_parameters():
            linear_weight = isinstance(module, nn.Linear) and leaf == "weight"
            count = param.numel() // (100 if linear_weight else 20)
            positions = torch.randperm(param.numel(), generator=generator)[:count].sort().values
            values = torch.randn(count, generator=generator)
            span = packer.add(positions, values, param.numel())
            setattr(delta, f"{leaf}_span", span)
        if factors and isinstance(module, nn.Linear):
            delta.up = torch.randn(module.out_features, 2, generator=generator).to(device)
            delta.down = torch.randn(module.in_features, 2, generator=generator).to(device)
    blocks, lows, values = packer.arrays(torch.device(device))
    return DecodedDiff(deltas, blocks, lows, values, 0)


def _synthetic_batch(device: str):
    """Modules whose widths do not divide 2**16 (some rows of the linear weight and of the
    table start in one 64Ki-position block and end in the next), a 7-row plan over three
    diffs, and inputs; ids include every table row that straddles a block boundary."""
    torch.manual_seed(0)
    modules = {
        "linear": nn.Linear(300, 250),  # 75,000 positions: 2 blocks
        "table": nn.Embedding(1000, 300),  # 300,000 positions: 5 blocks
        "norm": nn.LayerNorm(300),
    }
    for module in modules.values():
        module.requires_grad_(False)
        nn.init.normal_(module.weight)
        module.to(device)
    diffs = [
        _synthetic_diff(modules, seed=1, dtype=torch.float16, factors=False, device=device),
        _synthetic_diff(modules, seed=2, dtype=torch.float32, factors=True, device=device),
        _synthetic_diff(modules, seed=3, dtype=torch.float16, factors=False, device=device),
    ]
    # rows 0:2 one diff, 2:3 none, 3:6 two diffs (shared + residual), 6:7 the first again
    segments = [Segment(diffs[0], 0, 2), Segment(diffs[1], 3, 6), Segment(diffs[2], 3, 6)]
    segments.append(Segment(diffs[0], 6, 7))
    plan = plan_batch(segments, 7)
    straddling = torch.tensor([218, 436, 655, 873, 0, 999])
    ids = torch.cat([straddling, torch.randint(0, 1000, (7 * 4 - 6,))]).view(7, 4)
    inputs = {
        "linear": torch.randn(7, 4, 300),
        "table": ids,
        "norm": torch.randn(7, 4, 300) * 3 + 1,
    }
    return modules, plan, {name: x.to(device) for name, x in inputs.items()}


def _check_synthetic(kernel: str, name: str, broadcast: bool) -> None:
    device = _device(kernel)
    modules, plan, inputs = _synthetic_batch(device)
    module, x = modules[name], inputs[name][:1] if broadcast else inputs[name]
    _, run = select_kernel(kernel, torch.device(device), torch.float32)
    got = run(name, module, x, plan, module.forward)
    expected = oracle.run(name, module, x, plan, module.forward)
    for start, stop, covering in plan.intervals:
        tolerance = 1e-4 if covering else UNCHANGED  # 300-term sums of values near 1
        what = f"{name} rows {start}:{stop} of {tuple(x.shape)}"
        _close(got[start:stop].cpu(), expected[start:stop].cpu(), tolerance, what)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("name", "broadcast"),
    [("linear", False), ("table", False), ("table", True), ("norm", False), ("norm", True)],
)
def test_leaves_over_several_position_blocks_equal_the_oracle(kernel, name, broadcast):
    _check_synthetic(kernel, name, broadcast)


@pytest.mark.parametrize(
    "kernel",
    [
        "compiled",
        pytest.param("triton", marks=triton_runs_here),
    ],
)
def test_a_linear_input_shared_by_every_row_keeps_its_factors(kernel):
    _check_synthetic(kernel, "linear", True)


def _request_plan():
    """(diffs, inputs, artifact of the merged reference) for one batch of every kind."""
    return [
        (["sentiment"], TEXTS, "sentiment"),
        (["entail"], PAIRS, "entail"),
        (["rating"], TEXTS[:2], "rating"),
        (["topic"], TEXTS[1:], "topic"),
        (["shared", "residual"], TEXTS, "residual-composed"),
        (["sentiment"], ["another request of the same task"], "sentiment"),
        (["shared", "factored"], TEXTS[:2], "factored-composed"),
    ]


def _batch(predictor, base_dir, tasks, plan) -> list[torch.Tensor]:
    requests = [
        predictor.prepare(
            str(base_dir), [_resident(predictor, base_dir, tasks, n) for n in names], inputs
        )
        for names, inputs, _ in plan
    ]
    return predictor.batch_logits(requests)


@pytest.mark.parametrize("kernel", ["oracle", *KERNELS])
def test_one_batch_of_every_task_type_equals_the_oracle_and_each_merged_model(
    kernel, base_dir, tasks, merged, one_torch_thread
):
    plan = _request_plan()
    got = _batch(Predictor(kernel=kernel, device=_device(kernel)), base_dir, tasks, plan)
    reference = _batch(Predictor(kernel="oracle"), base_dir, tasks, plan)
    for (names, inputs, composed), logits, expected in zip(plan, got, reference, strict=True):
        _close(logits, expected, LOOSE, f"{names} against the oracle")
        _close(logits, merged(composed, inputs), LOOSE, f"{names} against the merged model")


@pytest.mark.parametrize("kernel", ["oracle", *KERNELS])
def test_two_tasks_in_one_batch_never_see_each_others_diff(
    kernel, base_dir, tasks, one_torch_thread
):
    predictor = Predictor(kernel=kernel, device=_device(kernel))

    def request(name):
        diffs = [_resident(predictor, base_dir, tasks, name)]
        return predictor.prepare(str(base_dir), diffs, TEXTS)

    alone = {name: predictor.batch_logits([request(name)])[0] for name in ("sentiment", "topic")}
    together = predictor.batch_logits([request("topic"), request("sentiment"), request("topic")])
    assert together[0].shape == (3, 3) and together[1].shape == (3, 2)
    _close(together[0], alone["topic"], LOOSE, "topic beside sentiment")
    _close(together[1], alone["sentiment"], LOOSE, "sentiment beside topic")
    _close(together[2], alone["topic"], LOOSE, "topic after sentiment")
    assert float((alone["topic"][:, :2] - alone["sentiment"]).abs().max()) > 1e-2


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
@pytest.mark.skipif(CUDA, reason="the Triton cases run on the CUDA device in this process")
def test_interpreted_triton_in_a_child_process(base_dir):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    command += ["-k", "triton and not child_process"]
    env = {**os.environ, "TRITON_INTERPRET": "1", BASE_DIR_VARIABLE: str(base_dir)}
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert " passed" in report and "skipped" not in report, report


def test_a_kernel_asked_for_by_name_that_cannot_run_here_is_an_error(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    from serving import kernels
    from serving.kernels import compiled, triton_kernel

    monkeypatch.setattr(triton_kernel, "INTERPRETED", False)
    with pytest.raises(KernelUnavailableError, match="needs a CUDA device"):
        select_kernel("triton", cpu, torch.float32)
    with pytest.raises(KernelUnavailableError, match="CPU with float32"):
        select_kernel("compiled", cuda, torch.float32)
    with pytest.raises(KernelUnavailableError, match="CPU with float32"):
        select_kernel("compiled", cpu, torch.float16)
    with pytest.raises(ValueError, match="unknown serving kernel"):
        select_kernel("fastest", cpu, torch.float32)

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "extension", no_compiler)
    with pytest.raises(KernelUnavailableError, match="no C\\+\\+ compiler"):
        select_kernel("compiled", cpu, torch.float32)
    monkeypatch.delattr(kernels, "triton_kernel")  # as if importing it failed
    monkeypatch.setitem(sys.modules, "serving.kernels.triton_kernel", None)
    with pytest.raises(KernelUnavailableError, match="'triton' is unavailable"):
        select_kernel("triton", cuda, torch.float32)
    with caplog.at_level(logging.WARNING, logger="serving.kernels"):
        assert select_kernel("auto", cpu, torch.float32) == ("oracle", oracle.run)
        assert select_kernel("auto", cuda, torch.float16) == ("oracle", oracle.run)
    assert [r.getMessage().endswith("using serving kernel 'oracle'") for r in caplog.records] == [
        True,
        True,
    ]
    assert select_kernel("auto", cpu, torch.float16) == ("oracle", oracle.run)
    assert select_kernel("oracle", cuda, torch.float16) == ("oracle", oracle.run)
