"""Consolidation quality benchmark: shipped tasks each diff-pruned alone at 0.5% density, then
consolidated under budget = sum of their nonzeros and half of it, with every strategy: the
trained re-prunes (elementwise, rank) and the training-free merges (ties, dare, task_arithmetic).

    python bench/consolidation.py [--quick] [--seeds 0,1] [--strategies elementwise,ties,...]

Per seed the single-task diffs are trained with that seed and the consolidation uses it too.
Each consolidation runs in its own process (bench/common.run_isolated): peak memory is that
process's RSS high-water mark during `consolidate` (VmHWM reset after the base, the data and the
diffs are loaded), next to what the loaded state already took. Stored entries and bytes are
what a run's budget accounts for: the shared blob once plus every task's residual blob
(factor entries counted as entries). A task is accepted by the runner's rule (tolerance points).

Economical by design (a shared 2-core CPU): training rows capped per task (the low-resource
task gets a quarter of the cap), short max_length, few epochs. Individual diffs are cached under
--cache, so re-runs only redo the consolidations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import (  # noqa: E402
    emit_result,
    mib,
    peak_rss_bytes,
    print_table,
    quiet,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
)

TASKS = (
    "movie-sentiment",
    "snippet-domain",
    "product-sentiment-fewshot",
    "tweet-sentiment-intensity",
    "news-sentiment-comparison",
)
LOW_RESOURCE = "product-sentiment-fewshot"
TRAINED = ("elementwise", "rank")
MERGES = ("ties", "dare", "task_arithmetic")
BUDGETS = ("sum", "half")
# Flags a worker process takes over from the parent (same data, cache and settings).
FORWARDED = (
    "tasks",
    "train_rows",
    "validation_rows",
    "low_resource_rows",
    "max_length",
    "epochs",
    "fit_epochs",
    "fix_epochs",
    "cache",
    "merge_weight",
    "ties_density",
    "dare_drop",
)


def capped(data, train_rows: int, validation_rows: int, seed: int = 0):
    """The task with at most `train_rows` / `validation_rows` rows (seeded random subsets)."""
    import dataclasses

    def take(table, n):
        if table.rows <= n:
            return table
        rows = sorted(random.Random(seed).sample(range(table.rows), n))
        return table.select(rows)

    return dataclasses.replace(
        data, train=take(data.train, train_rows), validation=take(data.validation, validation_rows)
    )


def task_data(name: str, args):
    """A shipped task capped to the benchmark's rows (the same rows for every seed)."""
    from worker.data import load_sample_task

    rows = args.train_rows
    if name == LOW_RESOURCE:
        rows = args.low_resource_rows or max(16, args.train_rows // 4)
    return capped(load_sample_task(name), rows, args.validation_rows)


def train_alone(name, data, base, args, seed: int):
    """Diff-prune one task alone at 0.5% density (cached); (SparseDiff, train seconds)."""
    from diffs.read import loads_artifact
    from diffs.write import dumps_artifact
    from worker.diffprune.config import DiffPruneConfig
    from worker.diffprune.trainer import train_diff

    config = DiffPruneConfig(
        density=0.005,
        epochs=args.epochs,
        fix_epochs=1,
        batch_size=16,
        max_length=args.max_length,
        device="cpu",
        seed=seed,
    )
    key = hashlib.sha256(
        f"{name}|{data.train.rows}|{data.validation.rows}|{config.to_json()}|{base.fingerprint}".encode()
    ).hexdigest()[:16]
    path = Path(args.cache) / f"{name}-{key}.safetensors"
    if path.exists():
        meta = json.loads(path.with_suffix(".json").read_text())
        diff = loads_artifact(path.read_bytes(), expected_fingerprint=base.fingerprint)
        return diff, meta["seconds"]
    result = train_diff(data, config, base=base)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dumps_artifact(result.diff))
    path.with_suffix(".json").write_text(json.dumps({"seconds": result.train_seconds}))
    return result.diff, result.train_seconds


def consolidation_config(args, *, strategy: str, budget: int, seed: int):
    """The run's ConsolidationConfig (merge options left at their defaults unless given)."""
    from worker.consolidation.config import ConsolidationConfig

    merge = {
        name: getattr(args, name)
        for name in ("merge_weight", "ties_density", "dare_drop")
        if getattr(args, name) is not None
    }
    return ConsolidationConfig(
        strategy=strategy,
        budget=budget,
        epochs=args.fit_epochs,
        fix_epochs=args.fix_epochs,
        batch_size=16,
        max_length=args.max_length,
        device="cpu",
        seed=seed,
        **merge,
    )


def consolidate_once(args, base, tasks, *, strategy: str, budget: int, seed: int) -> dict:
    """One consolidation: its metrics after, stored sizes, time and the RSS high-water mark."""
    from diffs.write import dumps_artifact
    from worker.consolidation.artifacts import evaluate_diff
    from worker.consolidation.fit import consolidate

    config = consolidation_config(args, strategy=strategy, budget=budget, seed=seed)
    loaded = rss_bytes()
    reset_peak_rss()
    result = consolidate(tasks, config, base=base)
    peak = peak_rss_bytes()
    after = {
        outcome.name: evaluate_diff(outcome.composed, task.data, base=base, config=config)["metric"]
        for task, outcome in zip(tasks, result.tasks, strict=True)
    }
    residual_bytes = sum(len(dumps_artifact(o.residual)) for o in result.tasks)
    return {
        "after": after,
        "stored_entries": result.total_nnz,
        "stored_bytes": len(dumps_artifact(result.shared)) + residual_bytes,
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "peak_rss": peak,
        "loaded_rss": loaded,
    }


def loaded_tasks(args, base, seed: int) -> list:
    """The benchmark's tasks with their cached individual diffs of `seed`."""
    from worker.consolidation.config import ConsolidationTask

    tasks = []
    for name in task_names(args):
        data = task_data(name, args)
        diff, _ = train_alone(name, data, base, args, seed)
        tasks.append(ConsolidationTask(name, data, diff))
    return tasks


def worker(args) -> None:
    """One consolidation in this (fresh) process; its result where `run_isolated` reads it."""
    import torch

    from diffs.basemodel import load_base

    quiet()
    torch.set_num_threads(args.threads)
    base = load_base("all-MiniLM-L6-v2")
    tasks = loaded_tasks(args, base, args.seed)
    emit_result(
        consolidate_once(
            args, base, tasks, strategy=args.strategy, budget=args.budget, seed=args.seed
        )
    )


def task_names(args) -> list[str]:
    """The benchmark's tasks, in order."""
    return [t for t in args.tasks.split(",") if t]


def forwarded(args) -> list[str]:
    """The parent's flags a worker needs, as command-line arguments."""
    out = []
    for name in FORWARDED:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def machine() -> str:
    """The CPU model and core count this runs on."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, no GPU"


def points(value: float) -> str:
    """A metric difference in points (x100), signed."""
    return f"{value * 100:+.2f}"


def mean(values: list[float]) -> float:
    """The arithmetic mean."""
    return statistics.fmean(values)


def single_task_tables(args, base) -> dict[int, dict[str, Any]]:
    """Per seed: each task's data, cached individual diff and its metric before consolidation."""
    from diffs.write import dumps_artifact
    from worker.consolidation.artifacts import evaluate_diff
    from worker.consolidation.config import ConsolidationConfig, ConsolidationTask

    eval_config = ConsolidationConfig(max_length=args.max_length, device="cpu")
    singles: dict[int, dict[str, Any]] = {}
    for seed in args.seed_list:
        rows, before, diffs, tasks = [], {}, {}, []
        for name in task_names(args):
            data = task_data(name, args)
            diff, seconds = train_alone(name, data, base, args, seed)
            metrics = evaluate_diff(diff, data, base=base, config=eval_config)
            before[name], diffs[name] = metrics["metric"], diff
            tasks.append(ConsolidationTask(name, data, diff))
            rows.append(
                [
                    name,
                    data.task_type,
                    data.train.rows,
                    data.validation.rows,
                    metrics["metric_name"],
                    f"{metrics['metric']:.4f}",
                    diff.nnz,
                    len(dumps_artifact(diff)),
                    f"{seconds:.0f}",
                ]
            )
        print_table(
            f"single-task diff pruning at 0.5%, seed {seed} (the current versions)",
            ["task", "type", "train", "val", "metric", "value", "nnz", "bytes", "train s"],
            rows,
        )
        singles[seed] = {"before": before, "diffs": diffs, "tasks": tasks}
    return singles


def run_all(args, base, singles) -> list[dict[str, Any]]:
    """Every (strategy, budget, seed) consolidation, each in its own process unless --in-process."""
    from worker.consolidation.config import accept

    runs = []
    tolerance = consolidation_config(args, strategy="elementwise", budget=1, seed=0).tolerance
    for seed in args.seed_list:
        before = singles[seed]["before"]
        total = sum(d.nnz for d in singles[seed]["diffs"].values())
        for strategy in args.strategy_list:
            for label in BUDGETS:
                budget = total if label == "sum" else total // 2
                if args.in_process:
                    tasks = singles[seed]["tasks"]
                    r = consolidate_once(
                        args, base, tasks, strategy=strategy, budget=budget, seed=seed
                    )
                else:
                    flags = ["--strategy", strategy, "--budget", str(budget), "--seed", str(seed)]
                    r = run_isolated("consolidation", flags + forwarded(args), threads=args.threads)
                r.update(strategy=strategy, label=label, budget=budget, seed=seed)
                r["before"] = before
                r["accepted"] = {
                    name: accept(before[name], r["after"][name], tolerance) for name in before
                }
                runs.append(r)
                print(
                    f"seed {seed} {strategy} {label} ({budget}): avg "
                    f"{mean(list(before.values())):.4f} -> {mean(list(r['after'].values())):.4f}, "
                    f"{sum(r['accepted'].values())}/{len(before)} accepted, "
                    f"{r['train_seconds']:.1f} s",
                    flush=True,
                )
    return runs


def quality_table(args, runs) -> None:
    """The issue's quality table: per seed rows and their mean, per strategy and budget."""
    rows = []
    for strategy in args.strategy_list:
        for label in BUDGETS:
            group = [r for r in runs if r["strategy"] == strategy and r["label"] == label]
            for r in group + ([None] if len(group) > 1 else []):
                members = group if r is None else [r]
                avg_before = mean([mean(list(m["before"].values())) for m in members])
                avg_after = mean([mean(list(m["after"].values())) for m in members])
                low = LOW_RESOURCE in members[0]["before"]
                rows.append(
                    [
                        strategy,
                        f"{label} ({members[0]['budget']})",
                        "mean" if r is None else r["seed"],
                        f"{avg_before:.4f}",
                        f"{avg_after:.4f}",
                        points(avg_after - avg_before),
                        f"{mean([m['before'][LOW_RESOURCE] for m in members]):.4f}" if low else "-",
                        f"{mean([m['after'][LOW_RESOURCE] for m in members]):.4f}" if low else "-",
                        f"{mean([sum(m['accepted'].values()) for m in members]):.1f}"
                        f"/{len(members[0]['before'])}",
                        round(mean([m["stored_entries"] for m in members])),
                        round(mean([m["stored_bytes"] for m in members])),
                        f"{mean([m['train_seconds'] for m in members]):.1f}",
                        f"{mib(mean([m['peak_rss'] for m in members])):.0f}",
                        f"{mib(mean([m['peak_rss'] - m['loaded_rss'] for m in members])):+.0f}",
                    ]
                )
    print_table(
        "quality: average metric (accuracy; Pearson for the regression task) before -> after; "
        "stored = shared once + every residual; peak RSS during the run "
        "(and over the loaded base + data + diffs)",
        [
            "strategy",
            "budget",
            "seed",
            "avg before",
            "avg after",
            "delta pts",
            "low before",
            "low after",
            "accepted",
            "stored entries",
            "stored bytes",
            "train s",
            "peak MiB",
            "over loaded",
        ],
        rows,
    )


def per_task_table(args, runs) -> None:
    """Each task's delta (points, mean over seeds) and how often it was accepted, per run."""
    names = list(runs[0]["before"])
    rows = []
    for strategy in args.strategy_list:
        for label in BUDGETS:
            group = [r for r in runs if r["strategy"] == strategy and r["label"] == label]
            cells = []
            for name in names:
                delta = mean([r["after"][name] - r["before"][name] for r in group])
                taken = sum(r["accepted"][name] for r in group)
                cells.append(f"{points(delta)} ({taken}/{len(group)})")
            rows.append([strategy, label, *cells])
    print_table(
        "per task: delta pts, mean over seeds (accepted in k of n seeds)",
        ["strategy", "budget", *names],
        rows,
    )


def goal_margins(args, runs) -> list[tuple[str, dict[int, float], str]]:
    """Each goal: its title, its margin in points per seed (positive = met), a note."""
    by = {(r["strategy"], r["label"], r["seed"]): r for r in runs}
    if "elementwise" not in args.strategy_list:
        return []

    def avg(run: dict, key: str) -> float:
        return mean(list(run[key].values()))

    def gain(run: dict) -> float:
        return (avg(run, "after") - avg(run, "before")) * 100

    seeds = args.seed_list
    goals = [
        (
            "half budget: elementwise within 0.5 pts of the individual diffs",
            {s: gain(by["elementwise", "half", s]) + 0.5 for s in seeds},
            "",
        )
    ]
    merges = [m for m in MERGES if m in args.strategy_list]
    for label in BUDGETS if merges else ():
        margin, note = {}, []
        for s in seeds:
            ew = by["elementwise", label, s]
            best = by[max(merges, key=lambda m, s=s: avg(by[m, label, s], "after")), label, s]
            margin[s] = (avg(ew, "after") - avg(best, "after")) * 100 - 1.0
            note.append(
                f"seed {s}: best merge {best['strategy']}, "
                f"bytes {ew['stored_bytes']} vs {best['stored_bytes']}"
            )
        goals.append(
            (
                f"{label} budget: elementwise beats the best merge by >= 1 pt",
                margin,
                "; ".join(note),
            )
        )
    if LOW_RESOURCE in runs[0]["before"]:
        low = {}
        for s in seeds:
            run = by["elementwise", "sum", s]
            low[s] = (run["after"][LOW_RESOURCE] - run["before"][LOW_RESOURCE]) * 100
        goals.append(("sum budget: the low-resource task gains (elementwise)", low, ""))
    return goals


def goals_table(args, runs) -> None:
    """Whether each goal is met per seed and on the mean, and where the spread exceeds the margin."""
    rows = []
    for title, margin, note in goal_margins(args, runs):
        values = [margin[s] for s in args.seed_list]
        average = mean(values)
        spread = max(values) - min(values)
        rows.append(
            [
                title,
                *[f"{v:+.2f}" for v in values],
                f"{average:+.2f}",
                "yes" if average > 0 else "no",
                f"{spread:.2f}" + (" > margin" if spread > abs(average) else ""),
                note,
            ]
        )
    if not rows:
        print("\ngoals: need the elementwise strategy in --strategies")
        return
    print_table(
        "goals: margin in points beyond the threshold (positive = met)",
        ["goal", *[f"seed {s}" for s in args.seed_list], "mean", "met", "spread", "note"],
        rows,
    )


def interference_table(args, runs, singles) -> None:
    """Per task: mean Jaccard / sign agreement / cosine to the others, and acceptance per run."""
    try:
        from diffs.interference import pairwise_interference
    except ImportError:
        print("\ninterference vs acceptance: diffs.interference is not there yet (skipped)")
        return
    import numpy as np

    names = list(runs[0]["before"])
    if len(names) < 2:
        return
    stats = {name: [[], [], []] for name in names}
    for seed in args.seed_list:
        matrix = pairwise_interference([singles[seed]["diffs"][n] for n in names], names)
        off = ~np.eye(len(names), dtype=bool)
        for i, name in enumerate(names):
            for slot, grid in enumerate((matrix.jaccard, matrix.sign_agreement, matrix.cosine)):
                stats[name][slot].append(float(np.nanmean(np.asarray(grid)[i][off[i]])))
    columns = [(s, label) for s in args.strategy_list for label in BUDGETS]
    rows = []
    for name in names:
        accepted = []
        for strategy, label in columns:
            group = [r for r in runs if r["strategy"] == strategy and r["label"] == label]
            accepted.append(f"{sum(r['accepted'][name] for r in group)}/{len(group)}")
        rows.append([name, *[f"{mean(v):.3f}" for v in stats[name]], *accepted])
    print_table(
        "interference vs acceptance: each task's mean to the others (over seeds), "
        "accepted in k of n seeds per run",
        ["task", "jaccard", "sign agree", "cosine", *[f"{s} {b}" for s, b in columns]],
        rows,
    )


def main() -> int:
    """Run the benchmark (or, with --worker, one consolidation) and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and steps, one seed")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--validation-rows", type=int, default=200)
    parser.add_argument(
        "--low-resource-rows",
        type=int,
        default=0,
        help="training rows of the low-resource task (default: a quarter of --train-rows)",
    )
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument(
        "--epochs", type=int, default=2, help="phase-1 epochs of the single-task runs"
    )
    parser.add_argument("--fit-epochs", type=float, default=1.0, help="consolidation phase 1")
    parser.add_argument("--fix-epochs", type=float, default=0.5, help="consolidation phase 2")
    parser.add_argument("--strategies", default=",".join(TRAINED + MERGES))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--merge-weight", type=float, help="lambda of the merges (default: config)")
    parser.add_argument("--ties-density", type=float, help="ties trim density (default: config)")
    parser.add_argument("--dare-drop", type=float, help="dare drop probability (default: config)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument(
        "--cache", default=str(Path(tempfile.gettempdir()) / "diffbank-bench-consolidation")
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the consolidations in this process (peak RSS then includes earlier runs' "
        "freed memory; --quick implies it)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.train_rows, args.validation_rows, args.max_length, args.epochs = 32, 32, 16, 1
        args.fit_epochs, args.fix_epochs, args.seeds = 0.5, 0.25, "0"
        args.in_process = True
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in args.strategy_list if s not in TRAINED + MERGES]
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(unknown)}")
    missing = [t for t in task_names(args) if t not in TASKS]
    if missing:
        parser.error(f"--tasks: not a shipped task: {', '.join(missing)}")

    import torch

    from diffs.basemodel import load_base
    from worker.consolidation.config import ConsolidationConfig

    torch.set_num_threads(args.threads)
    base = load_base("all-MiniLM-L6-v2")
    defaults = ConsolidationConfig()
    print(
        f"machine: {machine()}; torch threads {args.threads} per run; "
        f"base {base.name} ({base.n_params} parameters); peak memory: RSS high-water mark "
        + ("in this process (--in-process)" if args.in_process else "of each run's own process")
    )
    print(
        f"rows per task: train <= {args.train_rows} (low-resource task: "
        f"{args.low_resource_rows or max(16, args.train_rows // 4)}), "
        f"validation <= {args.validation_rows}; max_length {args.max_length}; "
        f"single-task epochs {args.epochs}+1 fix; consolidation epochs "
        f"{args.fit_epochs}+{args.fix_epochs} fix; seeds {args.seeds}; merges: lambda "
        f"{args.merge_weight or defaults.merge_weight}, ties density "
        f"{args.ties_density or defaults.ties_density}, dare drop "
        f"{defaults.dare_drop if args.dare_drop is None else args.dare_drop}"
    )
    singles = single_task_tables(args, base)
    runs = run_all(args, base, singles)
    quality_table(args, runs)
    per_task_table(args, runs)
    goals_table(args, runs)
    interference_table(args, runs, singles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
