"""The trainer's "auto" run length against the fixed 1 gated + 5 fixed-mask epochs, per shipped
task at 128, 500 and all training rows (and at sizes where the step bounds engage).

    python -m bench.run_length [--batch-size 32]

Prints optimizer steps (gated + fixed-mask) for the default α update (SGD) and for the ones
whose gates can close (sign, AdamW: their gated minimum). Where auto and 1 + 5 give the same
steps, the runs are the same run (same seed, same shuffles), so their metrics are equal.
"""

from __future__ import annotations

import argparse

from bench.common import print_table
from worker.data import load_sample_task
from worker.diffprune.config import DiffPruneConfig, run_steps

TASKS = (
    "movie-sentiment",
    "snippet-domain",
    "product-sentiment-fewshot",
    "tweet-sentiment-intensity",
    "news-sentiment-comparison",
)
LARGE_SIZES = (10_000, 100_000, 1_000_000)  # hypothetical sets where the bounds engage


def steps_row(label: str, rows: int, batch_size: int) -> list:
    """One table row: steps of 1 + 5 epochs and of auto for each α update."""
    fixed = DiffPruneConfig(batch_size=batch_size, epochs=1, fix_epochs=5)
    cells: list = [label, rows, "{} + {}".format(*run_steps(rows, fixed))]
    for optimizer in ("sgd", "sign", "adamw"):
        auto = DiffPruneConfig(batch_size=batch_size, alpha_optimizer=optimizer)
        cells.append("{} + {}".format(*run_steps(rows, auto)))
    return cells


def main() -> None:
    """Print the run-length table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for name in TASKS:
        total = load_sample_task(name).train.rows
        for size in sorted({min(128, total), min(500, total), total}):
            rows.append(steps_row(name, size, args.batch_size))
    for size in LARGE_SIZES:
        rows.append(steps_row("(any task)", size, args.batch_size))
    print_table(
        f"Optimizer steps, gated + fixed-mask (batch {args.batch_size})",
        [
            "task",
            "training rows",
            "1 + 5 epochs",
            "auto, SGD (default)",
            "auto, sign",
            "auto, AdamW",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
