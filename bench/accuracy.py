"""Accuracy, storage and cost of diff pruning against full finetuning, LoRA and head-only
training on shipped sample tasks, same base, same batches, same number of epochs.

    python -m bench.accuracy [--quick] [--tasks movie-sentiment,news-sentiment-comparison]

Every (task, method) runs in its own process; peak memory is that process's RSS high-water
mark (CPU) or torch.cuda.max_memory_allocated (CUDA). Diff pruning spends its epochs as
`--epochs - 1` gated epochs plus one fixed-mask epoch, so every method sees the data
`--epochs` times. Hyperparameters are the trainer's defaults (lr 1e-4 for the diff and the
full-finetuning encoder, 1e-3 for every head, 5e-4 for the kept values in phase 2) and
1e-3 for LoRA; none were tuned on these validation sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.common import emit_result, mib, peak_rss_bytes, print_table, quiet, run_isolated

METHODS = ["full", "lora", "head", "diff-0.5%", "diff-0.1%"]
DENSITIES = {"diff-0.5%": 0.005, "diff-0.1%": 0.001}


def worker(args: argparse.Namespace) -> None:
    """Train one method on one task in this process and emit its result."""
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    from bench.common import artifact_size, train_dense
    from registry.basemodel import load_base
    from worker.config import DiffPruneConfig
    from worker.data import load_sample_task
    from worker.trainer import train_diff

    data = load_sample_task(args.task)
    if args.max_train_rows and data.train.rows > args.max_train_rows:
        data.train = data.train.select(range(args.max_train_rows))  # files are shuffled already
    base = load_base(args.base)
    config = DiffPruneConfig(
        epochs=args.epochs - 1, fix_epochs=1, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, compile_gates=not args.no_compile,
        device=args.device,
    )
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.method in DENSITIES:
        config.density = DENSITIES[args.method]
        result = train_diff(data, config, base=base)
        metrics, stored = result.metrics, result.diff.nnz + sum(
            t.numel() for t in result.diff.head.values()
        )
        size, seconds = artifact_size(result.diff), result.train_seconds
    else:
        config.epochs, config.fix_epochs = args.epochs, 0
        dense = train_dense(data, config, base=base, method=args.method)
        metrics, stored, size, seconds = (
            dense.metrics, dense.stored_params, dense.artifact_bytes, dense.train_seconds
        )
    emit_result({
        "task": args.task, "method": args.method, "metric_name": metrics["metric_name"],
        "metric": metrics["metric"], "metrics": metrics, "stored_params": stored,
        "artifact_bytes": size, "train_seconds": seconds,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
        "train_rows": data.train.rows, "validation_rows": data.validation.rows,
    })


def main() -> None:
    """Run every (task, method) pair and print the table and the goal checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="movie-sentiment,news-sentiment-comparison")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train-rows", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="256 training rows, 2 epochs")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.max_train_rows, args.epochs = 256, 2
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (diff pruning needs a gated and a fixed epoch)")
    if args.worker:
        worker(args)
        return
    shared = ["--epochs", str(args.epochs), "--max-train-rows", str(args.max_train_rows),
              "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--seed", str(args.seed), "--base", args.base, "--device", args.device]
    shared += ["--no-compile"] if args.no_compile else []
    results = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            r = run_isolated("accuracy", ["--task", task, "--method", method, *shared], threads=args.threads)
            results.append(r)
            print(f"{task} {method}: {r['metric_name']} {r['metric']:.4f} "
                  f"({r['train_seconds']:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
    print_table(
        f"accuracy: {args.base}, {args.epochs} epochs, <= {args.max_train_rows} training rows, "
        f"{args.max_length} tokens, batch {args.batch_size}, seed {args.seed}, {args.threads} thread(s)",
        ["task", "method", "metric", "value", "stored params", "artifact bytes", "train s", "peak MiB"],
        [[r["task"], r["method"], r["metric_name"], r["metric"], r["stored_params"],
          r["artifact_bytes"], r["train_seconds"], mib(r["peak_bytes"])] for r in results],
    )
    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    summary = [[m, statistics.mean(r["metric"] for r in rs), statistics.mean(r["artifact_bytes"] for r in rs)]
               for m, rs in by_method.items()]
    print_table("mean over tasks", ["method", "mean metric", "mean artifact bytes"], summary)
    means = {row[0]: row[1] for row in summary}
    sizes = {row[0]: row[2] for row in summary}
    if {"full", "lora", "diff-0.5%"} <= set(means):
        gap = 100 * (means["full"] - means["diff-0.5%"])
        print("\ngoals (diff pruning at 0.5%):")
        print(f"  within 0.5 points of full finetuning: {gap:+.2f} points behind -> "
              f"{'met' if gap <= 0.5 else 'NOT met'}")
        print(f"  >= LoRA: {100 * (means['diff-0.5%'] - means['lora']):+.2f} points -> "
              f"{'met' if means['diff-0.5%'] >= means['lora'] else 'NOT met'}")
        ratio = sizes["diff-0.5%"] / sizes["lora"]
        print(f"  <= 1/3 of LoRA's bytes: {ratio:.3f} of LoRA -> {'met' if ratio <= 1 / 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
