"""Step time and peak memory of the diff-pruning trainer (phase 1 and phase 2) against plain
full finetuning of the same model on the same batch, each method in its own process.

    python -m bench.speed [--steps 8] [--warmup 3] [--batch-size 32] [--max-length 64]

Step time: median wall time of an optimizer step (forward, backward, updates) after the
warmup steps (which include torch.compile of the gate kernels and optimizer-state
allocation). Memory on CPU: the process's RSS high-water mark (VmHWM) over the timed steps,
reset after warmup with /proc/self/clear_refs, so it is the steady training peak; "above
idle" subtracts the RSS after the base model is loaded (interpreter, torch, the base).
On CUDA: torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import (
    emit_result,
    mib,
    peak_rss_bytes,
    print_table,
    quiet,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    train_dense,
)

METHODS = ["full", "prune", "prune-sign", "prune-adamw", "prune-dense", "prune-grad", "fix"]
LABELS = {
    "full": "full finetuning",
    "prune": "diff pruning, phase 1 (gated, SGD on α: the default)",
    "prune-sign": "diff pruning, phase 1 (gated, sign step on α)",
    "prune-adamw": "diff pruning, phase 1 (gated, AdamW on α)",
    "prune-dense": "phase 1 without gates (dense δ, then the projection)",
    "prune-grad": "phase 1 of a gradient-magnitude mask (|grad| accumulated, head only)",
    "fix": "diff pruning, phase 2 (mask fixed)",
}
ALPHA_OPTIMIZERS = {"prune": "sgd", "prune-sign": "sign", "prune-adamw": "adamw"}
MASK_METHODS = {"prune-dense": "dense", "prune-grad": "grad"}


def worker(args: argparse.Namespace) -> None:
    """Measure one method in this process and emit its result."""
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    from diffs.basemodel import load_base
    from worker.data import load_sample_task
    from worker.diffprune.config import DiffPruneConfig
    from worker.diffprune.trainer import train_diff

    data = load_sample_task(args.task)
    data.train = data.train.select(range(args.batch_size))  # one batch, the same every step
    data.validation = data.validation.select(range(8))
    base = load_base(args.base)
    steps = args.warmup + args.steps
    config = DiffPruneConfig(
        batch_size=args.batch_size,
        max_length=args.max_length,
        epochs=steps,
        fix_epochs=0,
        density=0.005,
        compile_gates=not args.no_compile,
        device=args.device,
    )
    if args.method == "fix":
        config.epochs, config.fix_epochs = 0, steps
    config.alpha_optimizer = ALPHA_OPTIMIZERS.get(args.method, config.alpha_optimizer)
    config.mask_method = MASK_METHODS.get(args.method, config.mask_method)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    idle = rss_bytes()
    marks: list[float] = []
    peak: list[int] = []

    def on_step(step: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if step == args.warmup:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
        if step == steps:
            peak.append(torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes())

    if args.method == "full":
        train_dense(data, config, base=base, method="full", on_step=on_step, max_steps=steps)
    else:
        train_diff(data, config, base=base, progress=lambda p: on_step(p.step))
    times = [b - a for a, b in zip(marks[args.warmup - 1 : -1], marks[args.warmup :], strict=True)]
    emit_result(
        {
            "method": args.method,
            "step_seconds": statistics.median(times),
            "peak_bytes": peak[0],
            "idle_bytes": 0 if cuda else idle,
            "device": "cuda" if cuda else "cpu",
        }
    )


def main() -> None:
    """Run every method in its own process and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--task", default="movie-sentiment")
    parser.add_argument("--base", default="all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=list(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--methods", default=",".join(METHODS), help=", ".join(LABELS))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    shared = [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--task",
        args.task,
        "--base",
        args.base,
        "--device",
        args.device,
    ] + (["--no-compile"] if args.no_compile else [])
    results = {
        m: run_isolated("speed", ["--method", m, *shared], threads=args.threads)
        for m in args.methods.split(",")
    }
    ref = results.get("full")
    rows = []
    for m, r in results.items():
        above = r["peak_bytes"] - r["idle_bytes"]
        row = [LABELS[m], r["step_seconds"], mib(r["peak_bytes"]), mib(above)]
        if ref:
            ref_above = ref["peak_bytes"] - ref["idle_bytes"]
            row += [
                r["step_seconds"] / ref["step_seconds"],
                r["peak_bytes"] / ref["peak_bytes"],
                above / ref_above if ref_above else float("nan"),
            ]
        rows.append(row)
    device = next(iter(results.values()))["device"]
    print_table(
        f"speed: {args.base}, batch {args.batch_size} x {args.max_length} tokens, {args.steps} timed "
        f"steps after {args.warmup} warmup, {args.threads} thread(s), device {device}",
        ["method", "step s", "peak MiB", "above idle MiB"]
        + (["step x", "peak x", "above-idle x"] if ref else []),
        rows,
    )


if __name__ == "__main__":
    main()
