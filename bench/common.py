"""Shared pieces of the benchmarks: baseline training (full, head only, LoRA), memory probes,
running one measurement per subprocess, and table printing.

The baselines reuse the trainer's batching, schedule, optimizer and evaluation helpers, so
their epochs use the same seeded shuffles as the trainer's (diff pruning restarts them at
its fixed-mask phase, see worker/diffprune/trainer.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "


# ---------------------------------------------------------------- memory (Linux /proc)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water resident set size since process start or the last `reset_peak_rss()`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark of this process (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, nearest-rank."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


# ---------------------------------------------------------------- subprocess runs


def run_isolated(script: str, args: list[str], *, threads: int) -> dict[str, Any]:
    """Run `python -m bench.<script> --worker ...` in a fresh process; its result dict."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--worker", *args, "--threads", str(threads)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"bench worker {args} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result where `run_isolated` finds it."""
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned text table."""
    cells = [[str(c) for c in columns]] + [[format_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for j, row in enumerate(cells):
        print(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def mib(n: float) -> float:
    return n / 2**20


# ---------------------------------------------------------------- baselines


@dataclass
class DenseResult:
    """A baseline run: metrics, what it would store, and its costs."""

    metrics: dict[str, Any]
    stored_params: int
    artifact_bytes: int
    train_seconds: float
    train_metrics: dict[str, Any] | None = None  # on the training rows, when asked for


def safetensors_bytes(tensors: dict[str, Any]) -> int:
    """Size of a safetensors file holding these tensors."""
    from safetensors.torch import save

    return len(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def train_dense(
    data: Any,
    config: Any,
    *,
    base: Any,
    method: str,
    lora_lr: float = 1e-3,
    on_step: Callable[[int], None] | None = None,
    max_steps: int | None = None,
    train_metric: bool = False,
) -> DenseResult:
    """Train a baseline with the trainer's batches and schedule.

    method: "full" (every parameter; encoder lr = config.lr, head lr = config.head_lr),
    "head" (frozen encoder, head only), "lora" (PEFT LoRA r=8 on query/value/dense, lr
    `lora_lr`, head trained). Steps: the diff trainer's two phases together on the same rows
    (`run_steps`: explicit steps or epochs, else "auto"), so a baseline sees the data as often
    as diff pruning with the same config. With `train_metric`
    the model is also evaluated on its training rows (how well it fits them).
    Stored sizes: each method's own artifact in its training dtype (fp32): the whole model
    (full), the head (head), PEFT's adapter state dict with the classifier (lora).
    """
    import torch

    from diffs.basemodel import head_parameters
    from worker.diffprune.config import run_steps
    from worker.diffprune.trainer import micro_batches
    from worker.kit.batching import encode_rows, label_tensor
    from worker.kit.evaluate import evaluate
    from worker.kit.model import prepare_model, resolve_device
    from worker.kit.optim import make_adamw
    from worker.kit.schedule import linear_warmup_decay

    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = prepare_model(base, data, device, share_base=method != "full")
    head = head_parameters(model)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=["query", "value", "dense"],
            task_type="SEQ_CLS",
            modules_to_save=["classifier"],
        )
        model = get_peft_model(model, lora)
        adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
        head_now = {
            n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
        }
        groups = [(list(adapters.values()), lora_lr), (list(head_now.values()), config.head_lr)]
    elif method == "head":
        groups = [(list(head.values()), config.head_lr)]
    elif method == "full":
        encoder = [p for p in model.base_model.parameters()]
        groups = [(encoder, config.lr), (list(head.values()), config.head_lr)]
    else:
        raise ValueError(f"unknown method {method!r}")
    optimizers = [(make_adamw(params, lr=lr), lr) for params, lr in groups]
    model.train()
    labels = label_tensor(data.train, data.task_type).to(device)
    total = sum(run_steps(data.train.rows, config))
    if max_steps is not None:
        total = min(total, max_steps)
    for step in range(total):
        for opt, lr in optimizers:
            opt.param_groups[0]["lr"] = lr * linear_warmup_decay(step, total, config.warmup)
        batches = micro_batches(data.train.rows, step, config)
        for rows in batches:
            batch = encode_rows(base, data.train, rows, config.max_length, device)
            batch["labels"] = labels[rows.to(device)]
            (model(**batch).loss / len(batches)).backward()
        for opt, _ in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1)
    train_seconds = time.perf_counter() - started

    def metrics_on(table: Any) -> dict[str, Any]:
        return evaluate(
            model,
            table,
            base=base,
            task_type=data.task_type,
            num_labels=data.num_labels,
            max_length=config.max_length,
            batch_size=config.eval_batch_size,
        )

    metrics = metrics_on(data.validation)
    train_metrics = metrics_on(data.train) if train_metric else None
    # Each method's own artifact: PEFT's adapter state dict (what save_pretrained writes,
    # training dtype fp32), the fp32 head, or the whole fp32 model (save_pretrained).
    if method == "lora":
        from peft import get_peft_model_state_dict

        stored = get_peft_model_state_dict(model)
    elif method == "head":
        stored = dict(head)
    else:
        stored = dict(model.named_parameters())
    return DenseResult(
        metrics=metrics,
        stored_params=sum(t.numel() for t in stored.values()),
        artifact_bytes=safetensors_bytes(stored),
        train_seconds=train_seconds,
        train_metrics=train_metrics,
    )


def artifact_size(diff: Any) -> int:
    """Bytes of a sparse diff as saved by diffs.write."""
    from diffs.write import dumps_artifact

    return len(dumps_artifact(diff))


def quiet() -> None:
    """Silence library warnings in worker processes (their stdout carries the result)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
