"""One short pass over every CUDA path, printing one table (run by bench/gpu_check.sh).

Checks: the trainer on a tiny base and on all-MiniLM-L6-v2 (bf16 autocast on CUDA), the
trainer's step-time and peak-memory ratios against full finetuning (bench/speed.py),
mixed-task serving against merged models, a small consolidation, and the same predictions
on CPU and on the device. Each check reports on its own; one failing does not stop the rest.
`--device cpu` runs the same script where no GPU is lent (to check the script itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROWS: list[list[str]] = []


def check(name: str, run: Callable[[], str]) -> None:
    """Run one check and add its row (ok or FAILED, seconds, what it measured)."""
    start = time.perf_counter()
    try:
        detail, status = run(), "ok"
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        detail, status = f"{type(exc).__name__}: {exc}"[:160], "FAILED"
    ROWS.append([name, status, f"{time.perf_counter() - start:.1f}", detail])


def _sample(name: str, rows: int):
    from worker.data import load_sample_task

    data = load_sample_task(name)
    keep = list(range(min(rows, data.train.rows)))
    return dataclasses.replace(data, train=data.train.select(keep))


def _tiny_base(directory: Path) -> str:
    from tests.fixtures.models import make_tiny_bert  # the tests' tiny random BERT

    return str(make_tiny_bert(directory))


def _train(base_name: str, task: str, rows: int, device: str, **overrides):
    from diffs.basemodel import load_base
    from worker.diffprune.config import DiffPruneConfig
    from worker.diffprune.trainer import train_diff

    config = DiffPruneConfig(device=device, epochs=1, fix_epochs=1, max_length=64, **overrides)
    return train_diff(_sample(task, rows), config, base=load_base(base_name))


def main() -> int:
    """Run every check on `--device` and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device
    workdir = Path(tempfile.mkdtemp(prefix="diffbank-gpu-check-"))
    import torch

    from diffs.write import dumps_artifact

    info = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"device {device}: {info}; torch {torch.__version__}", flush=True)
    tiny = _tiny_base(workdir / "tiny")
    trained: dict[str, object] = {}

    def train_tiny() -> str:
        result = _train(tiny, "movie-sentiment", 128, device, batch_size=16)
        trained["tiny"] = result
        return (
            f"accuracy {result.metrics['accuracy']:.3f}, peak {result.peak_memory_bytes >> 20} MiB"
        )

    def train_minilm() -> str:
        from worker.kit.model import autocast_for

        with autocast_for(torch.device(device)):
            dtype = torch.get_autocast_dtype(device.split(":")[0]) if device != "cpu" else None
        result = _train("all-MiniLM-L6-v2", "movie-sentiment", 256, device)
        trained["minilm"] = result
        return (
            f"accuracy {result.metrics['accuracy']:.3f}, {result.train_seconds:.1f} s, "
            f"peak {result.peak_memory_bytes >> 20} MiB, autocast {dtype}"
        )

    def speed_ratios() -> str:
        run = subprocess.run(
            [sys.executable, "-m", "bench.speed", "--device", device, "--steps", "6"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        print(run.stdout, flush=True)
        if run.returncode != 0:
            raise RuntimeError(run.stderr.strip().splitlines()[-1])
        return "table above (step x and peak x against full finetuning)"

    def mixed_serving() -> str:
        from bench.service import SENTENCES, random_sparse_diff
        from diffs.apply import build_task_model
        from diffs.basemodel import load_base
        from diffs.read import loads_artifact
        from serving.engine import Predictor

        base = load_base("all-MiniLM-L6-v2")
        heads = base.head_shapes("classification", 2)
        blobs = [
            dumps_artifact(random_sparse_diff(base, heads, density=0.005, seed=i)) for i in range(8)
        ]
        predictor = Predictor(device=device)
        texts = SENTENCES[:4]
        worst, start = 0.0, time.perf_counter()
        for i, blob in enumerate(blobs):
            resident = predictor.resolve("all-MiniLM-L6-v2", str(i), lambda b=blob: b)
            (served,) = predictor.run_batch(
                [predictor.prepare("all-MiniLM-L6-v2", [resident], texts)]
            )
            merged = build_task_model(base, loads_artifact(blob))
            with torch.no_grad():
                probs = merged(**base.encode(texts, None, max_length=64)).logits.softmax(-1)
            for answer, row in zip(served, probs, strict=True):
                worst = max(worst, abs(answer["score"] - float(row.max())))
        seconds = time.perf_counter() - start
        return f"8 tasks x 4 sentences, max |score - merged (CPU)| {worst:.2e}, {seconds:.1f} s"

    def consolidation() -> str:
        from diffs.basemodel import load_base
        from worker.consolidation.config import ConsolidationConfig, ConsolidationTask
        from worker.consolidation.fit import consolidate

        tasks = []
        for i, name in enumerate(("movie-sentiment", "snippet-domain")):
            result = _train(tiny, name, 96, device, batch_size=16, seed=i)
            tasks.append(ConsolidationTask(name, _sample(name, 96), result.diff))
        budget = sum(t.current.nnz for t in tasks) // 2
        config = ConsolidationConfig(budget=budget, device=device, epochs=0.5, fix_epochs=0.5)
        result = consolidate(tasks, config, base=load_base(tiny))
        return f"2 tasks, budget {budget:,}, shared nnz {result.shared.nnz:,}"

    def parity() -> str:
        from serving.engine import Predictor

        result = trained["minilm"]
        blob = dumps_artifact(result.diff)
        texts = ["a joyless, plodding film", "pure delight", "it was fine"]
        answers = {}
        for where in ("cpu", device):
            answers[where] = Predictor(device=where).predict_artifact(
                blob, texts, base="all-MiniLM-L6-v2"
            )
        same = [a["label"] for a in answers["cpu"]] == [a["label"] for a in answers[device]]
        gap = max(
            abs(a["score"] - b["score"])
            for a, b in zip(answers["cpu"], answers[device], strict=True)
        )
        if not same:
            raise AssertionError(f"labels differ: {answers}")
        return f"same labels, max |score gap| {gap:.2e}"

    check("train, tiny base", train_tiny)
    check("train, all-MiniLM-L6-v2", train_minilm)
    check("trainer vs full finetuning", speed_ratios)
    check("mixed-task serving", mixed_serving)
    check("consolidation, tiny base", consolidation)
    check("predict parity CPU vs device", parity)

    width = max(len(r[0]) for r in ROWS)
    print(f"\n{'check':<{width}}  status  seconds  result")
    for name, status, seconds, detail in ROWS:
        print(f"{name:<{width}}  {status:<6}  {seconds:>7}  {detail}")
    return 0 if all(r[1] == "ok" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
