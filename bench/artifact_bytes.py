"""Bytes per nonzero of the sparse-diff artifact against the entropy bound, and task-switch time.

Random global masks on the default base (all-MiniLM-L6-v2) at several densities, random
values, a real 2-label head. The whole file (header, metadata, head) counts in bytes/nnz.
The bound is log2 C(N, k) / (8k) + value bytes; the goal is <= 1.15 x bound for fp16 at 0.5%.

Run: `HF_HUB_OFFLINE=1 python bench/artifact_bytes.py [--base NAME] [--switches 200] [--threads 1]`
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from diffs import index_coding
from diffs.apply import apply_diff
from diffs.basemodel import LoadedBase, build_model, load_base
from diffs.build import diff_from_dense
from diffs.read import loads_artifact
from diffs.types import VALUE_DTYPES, ArtifactMeta, SparseDiff
from diffs.write import dumps_artifact

DENSITIES = (0.001, 0.005, 0.01)
GOAL_RATIO = 1.15


def entropy_bound(n: int, k: int, value_bytes: int) -> float:
    """log2 C(n, k) / (8k) + value bytes: the least bytes per nonzero for a uniform mask."""
    log2_binomial = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    return log2_binomial / (8 * k) + value_bytes


def random_task_diff(base: LoadedBase, density: float, value_dtype: str, seed: int) -> SparseDiff:
    """A diff with a uniform random global mask of exactly round(density * N) entries."""
    generator = torch.Generator().manual_seed(seed)
    k = round(density * base.n_params)
    flat = torch.zeros(base.n_params)
    positions = torch.randperm(base.n_params, generator=generator)[:k]
    flat[positions] = (torch.rand(k, generator=generator) + 0.5) * 1e-2  # nonzero in fp16
    deltas, offset = {}, 0
    for name, param in base.encoder.named_parameters():
        deltas[name] = flat[offset : offset + param.numel()].view(param.shape)
        offset += param.numel()
    model = build_model(base, task_type="classification", num_labels=2, label_names=["n", "p"])
    head = {n: p.detach() for n, p in model.named_parameters() if not n.startswith("bert.")}
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type="classification",
        label_names=["negative", "positive"],
        config={"density": density, "seed": seed, "lambda": 1.25e-7, "epochs": 3},
        metrics={"accuracy": 0.91, "macro_f1": 0.9},
    )
    return diff_from_dense(deltas, head, meta, value_dtype)


def per_tensor_file_bytes(diff: SparseDiff) -> int:
    """Size of the alternative layout: one Elias–Fano stream + values tensor per base tensor."""
    from safetensors.torch import save

    tensors = {}
    for name, idx in diff.indices.items():
        coded = index_coding.encode(idx.numpy(), math.prod(diff.shapes[name]))
        tensors[f"{name}.low"] = torch.from_numpy(coded.low)
        tensors[f"{name}.high"] = torch.from_numpy(coded.high)
        tensors[f"{name}.values"] = diff.values[name]
    for name, tensor in diff.head.items():
        tensors[f"head.{name}"] = tensor
    return len(save(tensors, metadata={"meta": diff.meta.to_json()}))


def switch_times(
    encoder: torch.nn.Module, diff: SparseDiff, switches: int
) -> tuple[float, float, float, float]:
    """Median ms of apply_diff and revert: wall clock, and CPU time of this thread.

    The CPU-time figures leave out time the process spent descheduled on a busy machine;
    they are exact for one torch thread.
    """
    apply_diff(encoder, diff).revert()  # warm the prepared-tensor cache
    samples: list[tuple[float, float, float, float]] = []
    for _ in range(switches):
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        applied = apply_diff(encoder, diff)
        wall1, cpu1 = time.perf_counter(), time.thread_time()
        applied.revert()
        wall2, cpu2 = time.perf_counter(), time.thread_time()
        samples.append((wall1 - wall0, wall2 - wall1, cpu1 - cpu0, cpu2 - cpu1))
    apply_wall, revert_wall, apply_cpu, revert_cpu = (
        statistics.median(column) * 1e3 for column in zip(*samples, strict=True)
    )
    return apply_wall, revert_wall, apply_cpu, revert_cpu


def main() -> None:
    """Print the bytes/nnz table and the switch-time table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="all-MiniLM-L6-v2")
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_base(args.base)
    encoder = build_model(base, task_type="classification", num_labels=2).base_model
    print(f"base {base.name}: N = {base.n_params}, torch threads = {torch.get_num_threads()}\n")
    cases = [(d, "float16") for d in DENSITIES] + [(0.005, "bfloat16"), (0.005, "float32")]
    header = (
        f"{'density':>8} {'values':>8} {'nnz':>8} {'file B':>9} {'B/nnz':>6} {'bound':>6} "
        f"{'ratio':>6} {'goal':>5} {'per-tensor B/nnz':>16} {'int32+val':>9} "
        f"{'decode ms':>9} {'apply ms':>8} {'revert ms':>9} {'apply cpu':>9} {'revert cpu':>10}"
    )
    print(header)
    print("-" * len(header))
    for density, value_dtype in cases:
        diff = random_task_diff(base, density, value_dtype, seed=0)
        data = dumps_artifact(diff)
        start = time.perf_counter()
        decoded = loads_artifact(
            data, expected_fingerprint=base.fingerprint, base_shapes=base.shapes
        )
        decode_ms = (time.perf_counter() - start) * 1e3
        value_bytes = torch.finfo(VALUE_DTYPES[value_dtype]).bits // 8
        bound = entropy_bound(base.n_params, diff.nnz, value_bytes)
        per_nnz = len(data) / diff.nnz
        goal = "ok" if per_nnz <= GOAL_RATIO * bound else "MISS"
        apply_ms, revert_ms, apply_cpu, revert_cpu = switch_times(encoder, decoded, args.switches)
        print(
            f"{density:>8.3%} {value_dtype:>8} {diff.nnz:>8} {len(data):>9} {per_nnz:>6.3f} "
            f"{bound:>6.3f} {per_nnz / bound:>6.3f} {goal:>5} "
            f"{per_tensor_file_bytes(diff) / diff.nnz:>16.3f} {4 + value_bytes:>9} "
            f"{decode_ms:>9.1f} {apply_ms:>8.3f} {revert_ms:>9.3f} {apply_cpu:>9.3f} "
            f"{revert_cpu:>10.3f}"
        )
    print(
        "\nB/nnz counts the whole file (header, metadata, head); goal: B/nnz <= "
        f"{GOAL_RATIO} x bound; apply/revert: median of {args.switches} switches, in place "
        "(wall clock; cpu = this thread's CPU time)."
    )


if __name__ == "__main__":
    main()
