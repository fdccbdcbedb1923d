"""Serving in process, through the engine's entry point (serving.engine.Predictor): batches of
16 requests, one 40-word text each, tasks drawn uniformly from T; no HTTP.

    python -m bench.serving_inprocess                          # T = 1, 16, 64 at 1 and 2 threads
    python -m bench.serving_inprocess --tasks 1,16 --threads 1 --kernels compiled,oracle

Rows, side by side in one process, batches interleaved so machine noise hits every row alike:
  (b) mixed: the batch's requests over their T tasks' random 0.5% diffs, one mixed forward
      (one row per kernel);
  (c) merged: every request for one task with an empty diff (the physical target);
  (d) PEFT: T LoRA r=8 adapters on every linear layer, `adapter_names` on the same texts
      (`--skip-peft` leaves it out; adapters are injected directly, the build time is printed).
A batch's time covers tokenising, the forward and the heads. Resident MiB is the process's RSS
after the T tasks were resolved, and MiB per task its growth divided by T.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from bench.common import mib, percentile, print_table, rss_bytes
from bench.service import MACHINE_NOTE
from bench.serving import make_artifacts, request_texts

REQUESTS = 16


def texts_40_words(rng: random.Random, count: int) -> list[str]:
    """`count` texts of 40 words drawn from the sample sentences (as the HTTP bench sends)."""
    return [request_texts(rng, "40-words")[0] for _ in range(count)]


def timed_batches(run_batch, batches: list[Any]) -> list[float]:
    """Seconds of each call of `run_batch` on each batch (after one warm-up call)."""
    run_batch(batches[0])
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        run_batch(batch)
        seconds.append(time.perf_counter() - start)
    return seconds


def summarise(label: str, count: int, seconds: list[float], sentences: int, rss: float, per_task):
    """One table row from per-batch seconds."""
    return [
        count,
        label,
        sentences / statistics.mean(seconds),
        statistics.median(seconds) * 1e3,
        percentile(seconds, 99) * 1e3,
        rss,
        per_task,
    ]


def build_peft(count: int) -> tuple[Any, Any, float]:
    """A MiniLM classifier with `count` LoRA r=8 adapters; (PEFT model, tokenizer, build s).

    Adapters after the first are injected into the layers directly (`add_adapter` re-marks
    every module trainable on each call, which grows with the adapter count)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from diffs.basemodel import quiet_transformers, resolve_base_path

    path = resolve_base_path("all-MiniLM-L6-v2")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"
    )
    start = time.perf_counter()
    model = get_peft_model(model, config, adapter_name="t0")
    for i in range(1, count):
        model.peft_config[f"t{i}"] = config
        model.base_model.inject_adapter(model.base_model.model, f"t{i}")
    return model.eval(), tokenizer, time.perf_counter() - start


def real_artifacts(paths: str, count: int) -> list[bytes]:
    """`count` artifacts cycling over trained ones (comma-separated .safetensors paths)."""
    from pathlib import Path

    files = [Path(p).read_bytes() for p in paths.split(",") if p]
    return [files[i % len(files)] for i in range(count)]


def run(args: argparse.Namespace, count: int, threads: int) -> list[list[Any]]:
    """The rows of one T at one thread count."""
    import torch

    from diffs.basemodel import load_base, resolve_base_path
    from serving.engine import Predictor

    torch.set_num_threads(threads)
    path = str(resolve_base_path("all-MiniLM-L6-v2"))
    base = load_base(path)
    rng = random.Random(count)
    batches = []
    for _ in range(args.batches):
        tasks = [rng.randrange(count) for _ in range(REQUESTS)]
        batches.append((tasks, texts_40_words(rng, REQUESTS)))
    rows = []
    empty = make_artifacts(base, 1, seed=0, empty=True)[0]
    artifacts = real_artifacts(args.artifacts, count) if args.artifacts else None
    artifacts = artifacts or make_artifacts(base, count, seed=1)
    for kernel in args.kernels.split(","):
        predictor = Predictor(kernel=kernel, cache_size=count + 1, cache_bytes=64 * 1024**3)
        predictor.base(path)
        before = rss_bytes()
        resident = [
            predictor.resolve(path, f"t{i}", lambda a=a: a) for i, a in enumerate(artifacts)
        ]
        after = rss_bytes()
        merged = predictor.resolve(path, "merged", lambda: empty)

        def mixed_batch(batch, predictor=predictor, resident=resident):
            tasks, texts = batch
            prepared = [
                predictor.prepare(path, [resident[t]], [text])
                for t, text in zip(tasks, texts, strict=True)
            ]
            predictor.batch_logits(prepared)

        def merged_batch(batch, predictor=predictor, merged=merged):
            prepared = [predictor.prepare(path, [merged], [text]) for text in batch[1]]
            predictor.batch_logits(prepared)

        mixed_s, merged_s = [], []
        for batch in batches:  # interleaved: noise lands on both rows alike
            mixed_s += timed_batches(mixed_batch, [batch])
            merged_s += timed_batches(merged_batch, [batch])
        rows.append(
            summarise(
                f"(b) mixed, {predictor.base(path).mixed.kernel}",
                count,
                mixed_s,
                REQUESTS,
                mib(after),
                mib(after - before) / count,
            )
        )
        if kernel == args.kernels.split(",")[0]:
            rows.append(summarise("(c) merged", count, merged_s, REQUESTS, mib(after), 0.0))
        del predictor, resident
    if not args.skip_peft:
        model, tokenizer, build_s = build_peft(count)
        print(f"PEFT: {count} adapters injected in {build_s:.1f} s")
        names = [f"t{i}" for i in range(count)]

        def peft_batch(batch):
            tasks, texts = batch
            encoded = tokenizer(
                texts, truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            with torch.inference_mode():
                model(**encoded, adapter_names=[names[t] for t in tasks]).logits.float()

        rows.append(
            summarise(
                "(d) PEFT LoRA r=8",
                count,
                timed_batches(peft_batch, batches),
                REQUESTS,
                mib(rss_bytes()),
                None,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the in-process serving table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="1,16,64", help="comma-separated T values")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per row")
    parser.add_argument("--kernels", default="auto", help="comma-separated serving kernels")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument(
        "--artifacts", default="", help="trained diffs (comma-separated files) instead of random"
    )
    args = parser.parse_args(argv)
    for threads in [int(t) for t in args.threads.split(",")]:
        rows = []
        for count in [int(t) for t in args.tasks.split(",")]:
            rows += run(args, count, threads)
        table = []
        for row in rows:
            merged = next(r for r in rows if r[0] == row[0] and r[1] == "(c) merged")
            table.append([*row, row[2] / merged[2]])
        print_table(
            f"In-process serving, MiniLM, {REQUESTS} requests x one 40-word text per batch, "
            f"{threads} torch thread(s) ({MACHINE_NOTE})",
            [
                "T",
                "path",
                "sentences/s",
                "p50 ms",
                "p99 ms",
                "resident MiB",
                "MiB per task",
                "/ (c)",
            ],
            table,
        )


if __name__ == "__main__":
    main()
