"""Consolidation scaling: peak RSS and step time of a consolidation fit against its task count.

    python -m bench.consolidation_scaling [--tasks-list 2,5,10,20,50] [--steps 5] [--warmup 2]

Each T runs in its own process on one torch thread. Its T synthetic tasks are slices of the
shipped movie-sentiment sample (every other one with its labels swapped), each with a synthetic
current version: a random diff at 0.5% density in every encoder tensor (random positions,
small random values) and a random head. The process sets the fit up as `consolidate` does
(dense shared set, one sparse residual per task on its current positions plus gradient-picked
candidates) and runs `--warmup` + `--steps` phase-1 steps, each timed with the progress
report's entry count. Peak RSS is the process's high-water mark over everything (base, data,
setup, steps). This measures cost, not accuracy.

Goals (issue 16, CPU): 50 tasks in <= 3 GB peak RSS; step time at T = 50 within 1.3x of T = 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from bench.common import emit_result, mib, peak_rss_bytes, print_table, quiet, run_isolated

SAMPLE = "movie-sentiment"
DENSITY = 0.005
RSS_GOAL_MIB = 3 * 1024
STEP_RATIO_GOAL = 1.3


def random_positions(numel: int, k: int, generator):
    """`k` distinct sorted positions below `numel`, drawn in O(k) memory (no permutation of N)."""
    import torch

    drawn = torch.unique(torch.randint(0, numel, (min(numel, 2 * k + 16),), generator=generator))
    while drawn.numel() < k:  # only for dense draws of tiny tensors
        more = torch.randint(0, numel, (2 * k,), generator=generator)
        drawn = torch.unique(torch.cat([drawn, more]))
    keep = torch.randperm(drawn.numel(), generator=generator)[:k]
    return drawn[keep].sort().values


def synthetic_tasks(base, count: int, rows: int, seed: int) -> list:
    """`count` slices of the sample (odd ones relabelled), each with a random 0.5% current diff."""
    import torch

    from diffs.build import make_meta_consistent
    from diffs.types import ArtifactMeta, SparseDiff
    from worker.consolidation.config import ConsolidationTask
    from worker.data import load_sample_task

    data = load_sample_task(SAMPLE)
    generator = torch.Generator().manual_seed(seed)
    shapes = base.shapes
    tasks = []
    for i in range(count):
        start = (i * rows) % max(1, data.train.rows - rows)
        train = data.train.select(range(start, start + rows))
        if i % 2:
            swap = dict(zip(train.label_names, reversed(train.label_names), strict=True))
            train = dataclasses.replace(train, labels=[swap[label] for label in train.labels])
        task_data = dataclasses.replace(data, train=train)
        indices, values = {}, {}
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            k = max(1, round(DENSITY * numel))
            indices[name] = random_positions(numel, k, generator)
            values[name] = torch.randn(k, generator=generator) * 1e-3
        head = {
            name: torch.randn(shape, generator=generator) * 0.02
            for name, shape in base.head_shapes(data.task_type, data.num_labels).items()
        }
        meta = ArtifactMeta(
            base_name=base.name,
            base_fingerprint=base.fingerprint,
            n_params=base.n_params,
            task_type=data.task_type,
            label_names=list(data.label_names),
            value_dtype="float32",
        )
        current = make_meta_consistent(
            SparseDiff(
                indices=indices,
                values=values,
                shapes={n: tuple(shapes[n]) for n in indices},
                head=head,
                meta=meta,
            )
        )
        tasks.append(ConsolidationTask(f"task-{i}", task_data, current))
    return tasks


def worker(args: argparse.Namespace) -> None:
    """Set up a T-task fit in this process, time its steps and emit the result."""
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    from diffs.basemodel import load_base
    from worker.consolidation.config import ConsolidationConfig, validate_request
    from worker.consolidation.fit import start_fit
    from worker.consolidation.state import SHARED

    base = load_base(args.base)
    tasks = synthetic_tasks(base, args.tasks, args.rows_per_task, args.seed)
    config = ConsolidationConfig(
        strategy=args.strategy,
        budget=min(base.n_params, sum(t.current.nnz for t in tasks)),
        epochs=1000.0,  # phase 1 outlasts the timed steps
        fix_epochs=0.0,
        batch_size=args.batch_size,
        max_length=args.max_length,
        candidate_ratio=args.candidate_ratio,
        candidate_batches=args.candidate_batches,
        device="cpu",
        seed=args.seed,
    )
    validate_request(tasks, config, base=base)
    started = time.perf_counter()
    fit = start_fit(tasks, config, base=base)
    setup_seconds = time.perf_counter() - started
    seconds = []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        fit.advance()
        fit.state.expected_nnz()  # what each step's progress report reads
        seconds.append(time.perf_counter() - started)
    residuals = [s for role, s in fit.state.sets.items() if role != SHARED]
    support = [sum(int(p.numel()) for p in s.positions.values()) for s in residuals]
    emit_result(
        {
            "tasks": args.tasks,
            "peak_rss_bytes": peak_rss_bytes(),
            "step_seconds": statistics.median(seconds[args.warmup :]),
            "setup_seconds": setup_seconds,
            "residual_entries": statistics.mean(support),
            "current_entries": statistics.mean(t.current.nnz for t in tasks),
            "residual_state_numel": statistics.mean(s.state_numel() for s in residuals),
        }
    )


def main() -> None:
    """Run one process per task count and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks-list", default="2,5,10,20,50", help="task counts T, one run each")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rows-per-task", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--strategy", default="elementwise", choices=("elementwise", "rank"))
    parser.add_argument("--candidate-ratio", type=float, default=1.0)
    parser.add_argument("--candidate-batches", type=int, default=4)
    parser.add_argument("--base", default="all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.worker:
        worker(args)
        return
    counts = sorted({int(t) for t in args.tasks_list.split(",") if t})
    if not counts or counts[0] < 1:
        parser.error("--tasks-list: task counts of at least 1, e.g. 2,5,10,20,50")
    shared = [
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
        *("--rows-per-task", str(args.rows_per_task), "--batch-size", str(args.batch_size)),
        *("--max-length", str(args.max_length), "--strategy", args.strategy),
        *("--candidate-ratio", str(args.candidate_ratio)),
        *("--candidate-batches", str(args.candidate_batches)),
        *("--base", args.base, "--seed", str(args.seed)),
    ]
    results = []
    for count in counts:
        r = run_isolated(
            "consolidation_scaling", ["--tasks", str(count), *shared], threads=args.threads
        )
        print(
            f"T={count}: {mib(r['peak_rss_bytes']):.0f} MiB, {r['step_seconds']:.3f} s/step",
            flush=True,
        )
        results.append(r)
    reference = results[0]["step_seconds"]
    rows = [
        [
            r["tasks"],
            round(mib(r["peak_rss_bytes"])),
            r["step_seconds"],
            r["step_seconds"] / reference,
            round(r["residual_entries"]),
            round(r["current_entries"]),
            r["setup_seconds"],
        ]
        for r in results
    ]
    print_table(
        f"Consolidation scaling: {args.base}, {args.strategy}, {args.threads} thread(s), "
        f"batch {args.batch_size} x {args.max_length} tokens, candidates "
        f"{args.candidate_ratio:g} x current ({args.candidate_batches} batches), median of "
        f"{args.steps} steps after {args.warmup}",
        [
            "T",
            "peak RSS MiB",
            "median step s",
            f"step / T={counts[0]}",
            "residual entries/task",
            "current entries/task",
            "setup s",
        ],
        rows,
    )
    largest = results[-1]
    print(
        f"\ngoals: T=50 peak RSS <= {RSS_GOAL_MIB} MiB; step at T=50 <= {STEP_RATIO_GOAL}x T=2. "
        f"here: T={largest['tasks']} {mib(largest['peak_rss_bytes']):.0f} MiB, "
        f"{largest['step_seconds'] / reference:.2f}x T={counts[0]}"
    )


if __name__ == "__main__":
    main()
