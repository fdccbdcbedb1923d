"""Time of `diffs.interference.pairwise_interference` for T tasks on the default base.

Synthetic diffs: uniformly random supports of `--density` (0.5%) of the base's parameters,
spread over its tensors, fp16 normal values, as `SparseDiff`s the way `loads_artifact` returns
them. The goal is 100 ms for 100 tasks of MiniLM size (N = 22.7M, about 113k entries each).

Run: `HF_HUB_OFFLINE=1 python -m bench.interference [--base NAME] [--tasks 10,50,100]
[--density 0.005] [--repeat 3]`
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch

from diffs.basemodel import load_base
from diffs.build import make_meta_consistent
from diffs.interference import pairwise_interference
from diffs.types import ArtifactMeta, SparseDiff

GOAL_MS = {100: 100.0}


def random_diffs(
    shapes: dict[str, tuple[int, ...]], meta: ArtifactMeta, count: int, density: float, seed: int
) -> list[SparseDiff]:
    """`count` diffs with uniformly random global supports of about `density` of the base."""
    rng = np.random.default_rng(seed)
    names = sorted(shapes)
    sizes = np.array([math.prod(shapes[n]) for n in names])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    diffs = []
    for _ in range(count):
        positions = np.unique(rng.integers(0, total, size=round(density * total)))
        cuts = np.searchsorted(positions, offsets)
        indices, values = {}, {}
        for t, name in enumerate(names):
            local = positions[cuts[t] : cuts[t + 1]] - offsets[t]
            if local.size:
                indices[name] = torch.from_numpy(local)
                values[name] = torch.from_numpy(rng.standard_normal(local.size).astype(np.float16))
        task_meta = ArtifactMeta(**{**meta.__dict__, "config": {}, "metrics": {}, "extra": {}})
        diff = SparseDiff(indices, values, {n: shapes[n] for n in indices}, {}, task_meta)
        diffs.append(make_meta_consistent(diff))
    return diffs


def time_call(diffs: list[SparseDiff], repeat: int) -> tuple[float, int]:
    """Best wall time (ms) of `repeat` calls, and the shared positions found (off-diagonal)."""
    best, shared = math.inf, 0
    for _ in range(repeat):
        start = time.perf_counter()
        matrix = pairwise_interference(diffs)
        best = min(best, (time.perf_counter() - start) * 1000)
        shared = int((matrix.shared.sum() - np.trace(matrix.shared)) // 2)
    return best, shared


def main() -> None:
    """Print the timing table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="all-MiniLM-L6-v2")
    parser.add_argument("--tasks", default="10,50,100", help="comma-separated task counts")
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = [int(c) for c in args.tasks.split(",")]

    base = load_base(args.base)
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type="classification",
        label_names=["negative", "positive"],
    )
    diffs = random_diffs(base.shapes, meta, max(counts), args.density, args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"pairwise_interference on {base.name} (N = {base.n_params:,}, density {args.density:.2%},"
        f" {diffs[0].nnz:,} entries per task); {platform.processor() or platform.machine()},"
        f" {os.cpu_count()} CPUs, load average {load:.1f}; best of {args.repeat}"
    )
    print(f"{'T':>5}  {'entries':>11}  {'shared pos.':>11}  {'ms':>9}  {'ms/task':>8}  goal")
    for count in counts:
        subset = diffs[:count]
        ms, shared = time_call(subset, args.repeat)
        entries = sum(d.nnz for d in subset)
        goal = f"{GOAL_MS[count]:.0f} ms" if count in GOAL_MS else ""
        print(f"{count:>5}  {entries:>11,}  {shared:>11,}  {ms:>9.1f}  {ms / count:>8.2f}  {goal}")


if __name__ == "__main__":
    main()
