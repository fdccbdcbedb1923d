"""Accuracy, storage and cost of diff pruning against full finetuning, LoRA and head-only
training on shipped sample tasks, same base, same shuffles, same number of epochs.

    python -m bench.accuracy [--quick] [--tasks movie-sentiment,snippet-domain] [--jobs 2]

Every (task, method, lr, seed) runs in its own process; peak memory is that process's RSS
high-water mark (CPU) or torch.cuda.max_memory_allocated (CUDA). `--epochs auto` (the
default): every method runs the steps the trainer's "auto" run length picks for the task with
the default config (gated + fixed-mask); `--epochs N` splits N epochs into gated and
fixed-mask epochs for diff pruning, N epochs for the others. Diff pruning runs with the
trainer's defaults.

Ablations of the gates, same k and the same run length as the default:
`diff-0.5%` (L0 gates, sign step on α: the default), `diff-0.5%-sgd` (plain SGD on α, the
trainer before it had working gates), `diff-0.5%-adamw` (AdamW on α, the reference code's),
`diff-0.5%-dense` (no gates: a dense diff, then the same projection), `diff-0.5%-grad` (top-k
accumulated |gradient|, as in SIFT), `diff-0.5%-random` (random positions, as in SHiRA).

The baselines get a learning-rate sweep (`--full-lrs`, `--lora-lrs`) and each task reports
the best lr by mean validation metric over the seeds: the trainer's defaults were chosen
looking at these validation splits, so the baselines are given the same advantage.
`--heldout-tasks` are tasks that were not looked at when the defaults were chosen; they are
reported in their own table and are not part of the goal checks.

Diagnostics: `--train-metric` adds each method's metric on its own training rows (does it
fit them?). Any density runs as `diff-<percent>%`; `diff-100%` with `--diff-fix-lrs 2e-4`
is the trainer with nothing pruned (its fixed-mask phase is then dense finetuning), which
separates what the two-phase loop costs from what the sparsity costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import emit_result, mib, peak_rss_bytes, print_table, quiet, run_isolated

METHODS = ["full", "lora", "head", "diff-0.5%", "diff-0.1%"]
DENSE_METHODS = ("full", "lora", "head")


# What each `diff-<percent>%-<variant>` changes in the trainer's default config.
DIFF_VARIANTS: dict[str, dict[str, str]] = {
    "": {},
    "l0": {},
    "sgd": {"alpha_optimizer": "sgd"},
    "sign": {"alpha_optimizer": "sign"},
    "adamw": {"alpha_optimizer": "adamw"},
    "dense": {"mask_method": "dense"},
    "grad": {"mask_method": "grad"},
    "random": {"mask_method": "random"},
}
AUTO_FIX_EPOCHS_SPLIT = 5  # fixed-mask share of an explicit --epochs N (the auto epochs target)


def diff_method(method: str) -> tuple[float, dict[str, str]] | None:
    """(density, config changes) of `diff-<percent>%[-<variant>]`; None for other methods."""
    if not method.startswith("diff-") or "%" not in method:
        return None
    number, _, variant = method[len("diff-") :].partition("%")
    variant = variant.removeprefix("-")
    if variant not in DIFF_VARIANTS:
        return None
    try:
        density = float(number) / 100
    except ValueError:
        return None
    return (density, DIFF_VARIANTS[variant]) if 0 < density <= 1 else None


def diff_density(method: str) -> float | None:
    """The density of a `diff-<percent>%[-<variant>]` method (diff-0.5% -> 0.005); else None."""
    parsed = diff_method(method)
    return None if parsed is None else parsed[0]


def diff_epochs(total: int) -> tuple[int, int]:
    """(gated, fixed-mask) epochs adding up to an explicit `total` (at least one gated)."""
    fix = min(AUTO_FIX_EPOCHS_SPLIT, total - 1)
    return total - fix, fix


def worker(args: argparse.Namespace) -> None:
    """Train one method on one task in this process and emit its result."""
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    from bench.common import artifact_size, train_dense
    from diffs.basemodel import load_base
    from worker.data import load_sample_task
    from worker.diffprune.config import DiffPruneConfig, run_steps
    from worker.diffprune.trainer import train_diff

    data = load_sample_task(args.task)
    if args.max_train_rows and data.train.rows > args.max_train_rows:
        data.train = data.train.select(range(args.max_train_rows))  # files are shuffled already
    base = load_base(args.base)
    config = DiffPruneConfig(
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        compile_gates=not args.no_compile,
        device=args.device,
    )
    if args.epochs == "auto":  # the default config's auto length, the same for every method
        config.prune_steps, config.fix_steps = run_steps(data.train.rows, config)
    elif args.epochs != "own":  # "own": each method's own auto length (gated minimums apply)
        config.epochs, config.fix_epochs = diff_epochs(int(args.epochs))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    parsed = diff_method(args.method)
    gates: dict[str, Any] = {}
    if parsed is not None:
        config.density = parsed[0]
        for name, value in parsed[1].items():
            setattr(config, name, value)
        if args.lr:
            config.fix_lr = args.lr
        config.validate()
        result = train_diff(data, config, base=base)
        metrics, stored = (
            result.metrics,
            result.diff.nnz + sum(t.numel() for t in result.diff.head.values()),
        )
        size, seconds = artifact_size(result.diff), result.train_seconds
        train_metrics = fitted_metrics(data, base, result.diff) if args.train_metric else None
        gates = {
            "gate_open_fraction": result.gate_open_fraction,
            "expected_nnz_at_projection": result.expected_nnz_at_projection,
            "n_params": result.diff.meta.n_params,
            "steps": [result.prune_steps, result.fix_steps],
        }
    else:
        if args.epochs not in ("auto", "own"):
            config.prune_steps = config.fix_steps = None
            config.epochs, config.fix_epochs = int(args.epochs), 0
        swept = {}  # lr 0: the method's own default (config.lr for full, train_dense's for LoRA)
        if args.method == "full" and args.lr:
            config.lr = args.lr
        elif args.method == "lora" and args.lr:
            swept["lora_lr"] = args.lr
        dense = train_dense(
            data, config, base=base, method=args.method, train_metric=args.train_metric, **swept
        )
        metrics, stored, size, seconds = (
            dense.metrics,
            dense.stored_params,
            dense.artifact_bytes,
            dense.train_seconds,
        )
        train_metrics = dense.train_metrics
    emit_result(
        {
            "task": args.task,
            "method": args.method,
            "lr": args.lr,
            "seed": args.seed,
            "metric_name": metrics["metric_name"],
            "metric": metrics["metric"],
            "metrics": metrics,
            "stored_params": stored,
            "artifact_bytes": size,
            "train_seconds": seconds,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
            "train_rows": data.train.rows,
            "validation_rows": data.validation.rows,
            **({"train_metric": train_metrics["metric"]} if train_metrics else {}),
            **gates,
        }
    )


def fitted_metrics(data: Any, base: Any, diff: Any) -> dict[str, Any]:
    """Metrics of base + diff on the rows it was trained on (how well it fits them)."""
    from diffs.apply import build_task_model
    from worker.kit.evaluate import evaluate

    model = build_task_model(base, diff)
    return evaluate(
        model,
        data.train,
        base=base,
        task_type=data.task_type,
        num_labels=data.num_labels,
        max_length=diff.meta.max_length,
    )


def read_results(path: Path) -> list[dict[str, Any]]:
    """Runs of an earlier `--out` file (a JSON list) or of its `.partial.jsonl` (one run per line)."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def planned_runs(args: argparse.Namespace, tasks: list[str]) -> list[tuple[str, str, float, int]]:
    """(task, method, lr, seed) for every run; lr 0 means the method's default (for diff
    methods the lr is the fixed-mask step, swept by `--diff-fix-lrs`)."""
    sweeps = {
        "full": parse_floats(args.full_lrs),
        "lora": parse_floats(args.lora_lrs),
        "head": [0.0],
    }
    return [
        (task, method, lr, seed)
        for task in tasks
        for method in args.methods.split(",")
        for lr in sweeps.get(method, parse_floats(args.diff_fix_lrs) or [0.0])
        for seed in parse_ints(args.seeds)
    ]


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def best_per_method(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method): the lr with the best mean metric over seeds, averaged."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["method"], r["lr"]), []).append(r)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for (task, method, lr), runs in groups.items():
        row = {
            "task": task,
            "method": method,
            "lr": lr,
            "metric_name": runs[0]["metric_name"],
            "metric": statistics.mean(r["metric"] for r in runs),
            "per_seed": [r["metric"] for r in sorted(runs, key=lambda r: r["seed"])],
            "stored_params": runs[0]["stored_params"],
            "artifact_bytes": statistics.mean(r["artifact_bytes"] for r in runs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
            "peak_bytes": max(r["peak_bytes"] for r in runs),
            "spread": statistics.stdev(r["metric"] for r in runs) if len(runs) > 1 else 0.0,
        }
        opened = [r["gate_open_fraction"] for r in runs if r.get("gate_open_fraction") is not None]
        if opened:
            row["gate_open_fraction"] = statistics.mean(opened)
        before = [
            r["expected_nnz_at_projection"] / r["n_params"]
            for r in runs
            if r.get("expected_nnz_at_projection") is not None
        ]
        if before:  # E[L0] of the gates, or the nonzeros of an ungated diff, over N
            row["l0_fraction"] = statistics.mean(before)
        if all("train_metric" in r for r in runs):
            row["train_metric"] = statistics.mean(r["train_metric"] for r in runs)
        if (task, method) not in best or row["metric"] > best[(task, method)]["metric"]:
            best[(task, method)] = row
    return list(best.values())


def print_results(
    title: str, rows: list[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, float]]:
    """The per-task table and the mean over tasks; returns the mean metric and the mean
    artifact bytes of each method."""
    fit = any("train_metric" in r for r in rows)
    print_table(
        title,
        [
            "task",
            "method",
            "lr",
            "metric",
            "mean",
            "per seed",
            "seed sd",
            *(["on train rows"] if fit else []),
            "E[L0]/N",
            "kept open",
            "stored params",
            "artifact bytes",
            "train s",
            "peak MiB",
        ],
        [
            [
                r["task"],
                r["method"],
                f"{r['lr']:g}" if r["lr"] else "default",
                r["metric_name"],
                r["metric"],
                " ".join(f"{v:.4f}" for v in r["per_seed"]),
                r["spread"],
                *([r.get("train_metric", "-")] if fit else []),
                r.get("l0_fraction", "-"),
                r.get("gate_open_fraction", "-"),
                r["stored_params"],
                int(r["artifact_bytes"]),
                r["train_seconds"],
                mib(r["peak_bytes"]),
            ]
            for r in rows
        ],
    )
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    summary = [
        [
            m,
            statistics.mean(r["metric"] for r in rs),
            statistics.mean(r["artifact_bytes"] for r in rs),
        ]
        for m, rs in by_method.items()
    ]
    print_table("mean over tasks", ["method", "mean metric", "mean artifact bytes"], summary)
    return {row[0]: row[1] for row in summary}, {row[0]: row[2] for row in summary}


def print_goals(means: dict[str, float], sizes: dict[str, float]) -> None:
    """The issue's three goals for diff pruning at 0.5%."""
    if not {"full", "lora", "diff-0.5%"} <= set(means):
        return
    gap = 100 * (means["full"] - means["diff-0.5%"])
    print("\ngoals (diff pruning at 0.5%):")
    print(
        f"  within 0.5 points of full finetuning: {gap:+.2f} points behind -> "
        f"{'met' if gap <= 0.5 else 'NOT met'}"
    )
    print(
        f"  >= LoRA: {100 * (means['diff-0.5%'] - means['lora']):+.2f} points -> "
        f"{'met' if means['diff-0.5%'] >= means['lora'] else 'NOT met'}"
    )
    ratio = sizes["diff-0.5%"] / sizes["lora"]
    print(
        f"  <= 1/3 of LoRA's bytes: {ratio:.3f} of LoRA -> {'met' if ratio <= 1 / 3 else 'NOT met'}"
    )


def main() -> None:
    """Run every planned run and print the tables and the goal checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="movie-sentiment,snippet-domain")
    parser.add_argument(
        "--heldout-tasks",
        default="product-sentiment-fewshot",
        help="tasks not used to choose the defaults (own table, no goals)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="full, lora, head, diff-<percent>%%[-variant] (any density, e.g. diff-2%%; "
        f"variants: {', '.join(v for v in DIFF_VARIANTS if v)})",
    )
    parser.add_argument(
        "--epochs",
        default="auto",
        help="auto (the trainer's auto run length of the default config, for every method) "
        "or N epochs for every method (diff: split into gated + fixed-mask), or own (each "
        "diff variant's own auto length: sign / adamw get the gated phase their gates need)",
    )
    parser.add_argument(
        "--max-train-rows",
        type=int,
        default=500,
        help="first rows of each task's training file (0: all of them)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--full-lrs", default="5e-5,1e-4,2e-4", help="full finetuning lr sweep")
    parser.add_argument("--lora-lrs", default="1e-3,3e-3", help="LoRA lr sweep")
    parser.add_argument(
        "--diff-fix-lrs",
        default="",
        help="fixed-mask lr sweep of the diff methods (default: the trainer's rule)",
    )
    parser.add_argument("--base", default="all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--device", default="")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="256 training rows, 2 epochs, one seed, no lr sweeps, no held-out task",
    )
    parser.add_argument(
        "--train-metric",
        action="store_true",
        help="also report each method's metric on its training rows (under- or overfit)",
    )
    parser.add_argument("--out", type=Path, help="also write every run's result as JSON here")
    parser.add_argument(
        "--include",
        type=Path,
        action="append",
        default=[],
        help="add the runs of an earlier --out file or its .partial.jsonl (e.g. other seeds, "
        "or a stopped sweep) to the tables; runs already there are not run again",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.max_train_rows, args.epochs, args.seeds = 256, "2", "0"
        args.full_lrs, args.lora_lrs, args.heldout_tasks = "1e-4", "1e-3", ""
    unknown = [
        m for m in args.methods.split(",") if m not in DENSE_METHODS and diff_density(m) is None
    ]
    if unknown:
        parser.error(
            f"--methods: unknown {', '.join(unknown)} (full, lora, head or diff-<percent>%)"
        )
    if args.epochs not in ("auto", "own") and (not args.epochs.isdigit() or int(args.epochs) < 2):
        parser.error(
            "--epochs: auto, own, or at least 2 (diff pruning needs a gated and a fixed epoch)"
        )
    if args.worker:
        worker(args)
        return
    shared = [
        "--epochs",
        str(args.epochs),
        "--max-train-rows",
        str(args.max_train_rows),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--base",
        args.base,
        "--device",
        args.device,
    ]
    shared += ["--no-compile"] if args.no_compile else []
    shared += ["--train-metric"] if args.train_metric else []
    tasks = [t for t in args.tasks.split(",") if t]
    heldout = [t for t in args.heldout_tasks.split(",") if t]
    included = [r for path in args.include for r in read_results(path)]
    done = {(r["task"], r["method"], float(r["lr"]), int(r["seed"])) for r in included}
    runs = [plan for plan in planned_runs(args, tasks + heldout) if plan not in done]
    partial = args.out.with_suffix(".partial.jsonl") if args.out else None
    lock = threading.Lock()

    def run(plan: tuple[str, str, float, int]) -> dict[str, Any]:
        task, method, lr, seed = plan
        r = run_isolated(
            "accuracy",
            ["--task", task, "--method", method, "--lr", str(lr), "--seed", str(seed), *shared],
            threads=args.threads,
        )
        print(
            f"{task} {method} lr {lr:g} seed {seed}: {r['metric_name']} {r['metric']:.4f} "
            f"({r['train_seconds']:.0f} s)",
            flush=True,
        )
        if partial is not None:  # each finished run at once, so a stopped sweep can --include it
            with lock, partial.open("a") as handle:
                handle.write(json.dumps(r, sort_keys=True) + "\n")
        return r

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run, runs))
    results += included
    seeds = sorted({r["seed"] for r in results})
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
    if args.epochs == "auto":
        length = "auto run length (the default config's, every method)"
    elif args.epochs == "own":
        length = "each method's own auto run length (gated minimums for sign / adamw)"
    else:
        gated, fix = diff_epochs(int(args.epochs))
        length = f"{args.epochs} epochs (diff: {gated} gated + {fix} fixed)"
    train_rows = f"<= {args.max_train_rows}" if args.max_train_rows else "all"
    setting = (
        f"{args.base}, {length}, "
        f"{train_rows} training rows, {args.max_length} tokens, "
        f"batch {args.batch_size}, seeds {','.join(map(str, seeds))}, "
        f"{args.threads} thread(s) x {args.jobs} job(s)"
    )
    rows = best_per_method(results)
    means, sizes = print_results(f"accuracy: {setting}", [r for r in rows if r["task"] in tasks])
    print_goals(means, sizes)
    if heldout:
        print_results(
            "held out (not used to choose the defaults)", [r for r in rows if r["task"] in heldout]
        )


if __name__ == "__main__":
    main()
