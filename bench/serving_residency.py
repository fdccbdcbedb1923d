"""Many tasks resident in one serving process: RSS per task, and batch speed at T tasks
against T = 1, through the engine's entry point (serving.engine.Predictor), in process.

    python -m bench.serving_residency                    # T = 10,000
    python -m bench.serving_residency --tasks 1000 --batches 10

Tasks are random 0.5% diffs on MiniLM (eight distinct diffs, each task its own artifact and
head, so each is decoded and held on its own), made on demand as the engine fetches them.
Batches: 16 requests, one 40-word text each, tasks drawn uniformly from the resident T.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench.common import mib, percentile, print_table, rss_bytes
from bench.service import MACHINE_NOTE
from bench.serving import make_artifacts
from bench.serving_inprocess import REQUESTS, texts_40_words


def main(argv: list[str] | None = None) -> None:
    """Print the residency table."""
    import torch
    from tqdm import tqdm

    from diffs.basemodel import load_base, resolve_base_path
    from diffs.read import loads_artifact
    from diffs.write import dumps_artifact
    from serving.engine import Predictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = str(resolve_base_path("all-MiniLM-L6-v2"))
    base = load_base(path)
    templates = [loads_artifact(a) for a in make_artifacts(base, 8, seed=1)]
    generator = torch.Generator().manual_seed(2)

    def artifact(i: int) -> bytes:
        diff = templates[i % len(templates)]
        diff.head = {
            name: torch.randn(t.shape, generator=generator) * 0.1 for name, t in diff.head.items()
        }
        return dumps_artifact(diff)

    predictor = Predictor(cache_size=args.tasks + 1, cache_bytes=1 << 40)
    predictor.base(path)
    rng = random.Random(0)
    batches = [
        ([rng.random() for _ in range(REQUESTS)], texts_40_words(rng, REQUESTS))
        for _ in range(args.batches)
    ]

    def timed(resident: list) -> list[float]:
        seconds = []
        for draws, texts in [batches[0], *batches]:
            start = time.perf_counter()
            requests = [
                predictor.prepare(path, [resident[int(d * len(resident))]], [text])
                for d, text in zip(draws, texts, strict=True)
            ]
            predictor.batch_logits(requests)
            seconds.append(time.perf_counter() - start)
        return seconds[1:]

    before = rss_bytes()
    resident = [predictor.resolve(path, "t0", lambda: artifact(0))]
    one = timed(resident)
    start = time.perf_counter()
    for i in tqdm(range(1, args.tasks), desc="resolving tasks", mininterval=5):
        resident.append(predictor.resolve(path, f"t{i}", lambda i=i: artifact(i)))
    load_s = time.perf_counter() - start
    after = rss_bytes()
    many = timed(resident)
    rows = [
        [
            1,
            REQUESTS / statistics.mean(one),
            statistics.median(one) * 1e3,
            percentile(one, 99) * 1e3,
            "",
            "",
        ],
        [
            args.tasks,
            REQUESTS / statistics.mean(many),
            statistics.median(many) * 1e3,
            percentile(many, 99) * 1e3,
            mib(after),
            mib(after - before) / args.tasks,
        ],
    ]
    print(
        f"decoded {args.tasks} tasks in {load_s:.0f} s; resident bytes by the cache: "
        f"{mib(predictor.cache_stats()['bytes']):.0f} MiB"
    )
    print_table(
        f"Resident tasks on one MiniLM base, {REQUESTS} x one 40-word text per batch, "
        f"{args.threads} thread(s) ({MACHINE_NOTE}); T = {args.tasks} runs at "
        f"{statistics.mean(one) / statistics.mean(many):.2f}x the sentences/s of T = 1",
        ["T", "sentences/s", "p50 ms", "p99 ms", "RSS MiB", "MiB per task"],
        rows,
    )


if __name__ == "__main__":
    main()
