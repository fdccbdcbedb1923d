"""Consolidation benchmark: three sample tasks on the default base, each first diff-pruned alone at
0.5% density, then re-fitted together under budget = sum of their nonzeros and half of it, with
the element-wise and the rank strategy. Prints one table per run and a summary.

    python bench/consolidation.py [--quick] [--train-rows 256] [--validation-rows 200]

Economical by design (a shared 2-core CPU): training rows capped per task (the low-resource
task keeps all of its 128), short max_length, few epochs. Individual diffs are cached under
--cache so re-runs only redo the consolidations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("movie-sentiment", "snippet-domain", "product-sentiment-fewshot")
LOW_RESOURCE = "product-sentiment-fewshot"


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


def train_alone(name, data, base, args):
    """Diff-prune one task alone at 0.5% density (cached); (SparseDiff, train seconds)."""
    from registry.artifact import dumps_artifact, loads_artifact
    from worker.diffprune.config import DiffPruneConfig
    from worker.diffprune.trainer import train_diff

    config = DiffPruneConfig(
        density=0.005,
        epochs=args.epochs,
        fix_epochs=1,
        batch_size=16,
        max_length=args.max_length,
        device="cpu",
        seed=0,
    )
    key = hashlib.sha256(
        f"{name}|{data.train.rows}|{data.validation.rows}|{config.to_json()}|{base.fingerprint}".encode()
    ).hexdigest()[:16]
    path = Path(args.cache) / f"{name}-{key}.safetensors"
    if path.exists():
        meta = json.loads(path.with_suffix(".json").read_text())
        return loads_artifact(path.read_bytes(), expected_fingerprint=base.fingerprint), meta[
            "seconds"
        ]
    result = train_diff(data, config, base=base)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dumps_artifact(result.diff))
    path.with_suffix(".json").write_text(json.dumps({"seconds": result.train_seconds}))
    return result.diff, result.train_seconds


def main() -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rows and steps (smoke run)")
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
    parser.add_argument("--strategies", default="elementwise,rank")
    parser.add_argument(
        "--cache", default=str(Path(tempfile.gettempdir()) / "diffbank-bench-consolidation")
    )
    args = parser.parse_args()
    if args.quick:
        args.train_rows, args.validation_rows, args.epochs = 64, 64, 1
        args.fit_epochs, args.fix_epochs = 0.5, 0.25

    import torch

    from bench.common import print_table
    from registry.artifact import dumps_artifact
    from registry.basemodel import load_base
    from worker.consolidation.artifacts import evaluate_diff
    from worker.consolidation.config import ConsolidationConfig, ConsolidationTask, accept
    from worker.consolidation.fit import consolidate
    from worker.data import load_sample_task

    torch.manual_seed(0)
    base = load_base("all-MiniLM-L6-v2")
    print(
        f"machine: {os.cpu_count()}-core CPU, no GPU; torch threads {torch.get_num_threads()}; "
        f"base {base.name} ({base.n_params} parameters)"
    )
    print(
        f"rows per task: train <= {args.train_rows} (low-resource task: a quarter), "
        f"validation <= {args.validation_rows}; "
        f"max_length {args.max_length}; single-task epochs {args.epochs}+1 fix; "
        f"consolidation epochs {args.fit_epochs}+{args.fix_epochs} fix"
    )
    tasks = []
    eval_config = ConsolidationConfig(max_length=args.max_length, device="cpu")
    single_rows = []
    for name in TASKS:
        rows = args.train_rows
        if name == LOW_RESOURCE:
            rows = args.low_resource_rows or max(16, args.train_rows // 4)
        data = capped(load_sample_task(name), rows, args.validation_rows)
        diff, seconds = train_alone(name, data, base, args)
        metrics = evaluate_diff(diff, data, base=base, config=eval_config)
        tasks.append((ConsolidationTask(name, data, diff), metrics))
        single_rows.append(
            [
                name,
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
        "single-task diff pruning at 0.5% (the current versions)",
        ["task", "train rows", "val rows", "metric", "value", "nnz", "bytes", "train s"],
        single_rows,
    )
    total = sum(t.current.nnz for t, _ in tasks)
    summary = []
    for strategy in args.strategies.split(","):
        for label, budget in (("sum", total), ("half", total // 2)):
            config = ConsolidationConfig(
                strategy=strategy,
                budget=budget,
                epochs=args.fit_epochs,
                fix_epochs=args.fix_epochs,
                batch_size=16,
                max_length=args.max_length,
                device="cpu",
                seed=0,
            )
            started = time.monotonic()
            result = consolidate([t for t, _ in tasks], config, base=base)
            seconds = time.monotonic() - started
            rows = []
            before_avg = after_avg = 0.0
            low_delta = 0.0
            for (task, before), outcome in zip(tasks, result.tasks, strict=True):
                after = evaluate_diff(outcome.composed, task.data, base=base, config=config)
                ok = accept(before["metric"], after["metric"], config.tolerance)
                delta = (after["metric"] - before["metric"]) * 100
                before_avg += before["metric"] / len(tasks)
                after_avg += after["metric"] / len(tasks)
                if task.name == LOW_RESOURCE:
                    low_delta = delta
                rows.append(
                    [
                        task.name,
                        f"{before['metric']:.4f}",
                        f"{after['metric']:.4f}",
                        f"{delta:+.2f}",
                        outcome.nnz,
                        len(dumps_artifact(outcome.composed)),
                        "yes" if ok else "no",
                    ]
                )
            rows.append(
                ["(shared)", "", "", "", result.shared_nnz, len(dumps_artifact(result.shared)), ""]
            )
            print_table(
                f"{strategy}, budget = {label} of the individual nonzeros = {budget} "
                f"(stored after: {result.total_nnz}; {result.steps} steps, {seconds:.0f} s)",
                ["task", "before", "after", "delta pts", "nnz", "bytes", "accepted"],
                rows,
            )
            summary.append(
                [
                    strategy,
                    f"{label} ({budget})",
                    f"{before_avg:.4f}",
                    f"{after_avg:.4f}",
                    f"{(after_avg - before_avg) * 100:+.2f}",
                    f"{low_delta:+.2f}",
                    result.total_nnz,
                    f"{seconds:.0f}",
                ]
            )
    print_table(
        "summary (goal: sum -> average >= individual, low-resource gains; "
        "half -> within 0.5 points)",
        [
            "strategy",
            "budget",
            "avg before",
            "avg after",
            "delta pts",
            "low-resource delta",
            "stored nnz",
            "seconds",
        ],
        summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
