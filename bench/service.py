"""Service benchmarks: API latency under concurrent clients, and multi-task prediction serving.

    python -m bench.service                 # both parts
    python -m bench.service --part api      # job status / submission latency (real uvicorn)
    python -m bench.service --part serving  # task switching on one base (MiniLM)

API part: a real uvicorn server (`api.app:create_app`) over SQLite + file store + a real Redis
broker (no worker: submitted jobs stay queued). `--clients` threads each keep one HTTP
connection and send requests back to back; latency is per request, seen by the client.

Serving part: the apply/revert path alone (one model on the default base, all-MiniLM-L6-v2; the API now serves mixed batches, see bench/serving.py), 50
tasks given as RANDOM sparse diffs at 0.5% density (uniformly random positions, small random
values) with a random head of the trained shape. Timing does not depend on the values, so
trained diffs would cost the same. Requests (batches of short sentences) go round robin over
the tasks: every request applies its task's diff, runs the forward pass, reverts. Compared
with serving one task from a model with that diff merged once (no apply/revert), and with
loading a fully finetuned checkpoint (`from_pretrained`) per task switch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import percentile, print_table

MACHINE_NOTE = "machine: 2-core CPU, no GPU (shared with other jobs; numbers are noisy)"
SENTENCES = [
    "the film was a delight from start to finish",
    "service was slow and the food arrived cold",
    "an honest, moving story with a weak ending",
    "i would not recommend this hotel to anyone",
    "great value for the price and friendly staff",
    "the plot drags but the acting is superb",
    "terrible battery life, returned it after a week",
    "a pleasant surprise, better than the reviews said",
]


def latency_row(name: str, samples_s: list[float], wall_s: float) -> list[Any]:
    """A table row: requests, p50/p90/p99/max in ms, throughput."""
    ms = [s * 1000 for s in samples_s]
    return [
        name,
        len(ms),
        percentile(ms, 50),
        percentile(ms, 90),
        percentile(ms, 99),
        max(ms),
        len(ms) / wall_s,
    ]


# ---------------------------------------------------------------- API latency


def run_clients(
    n_clients: int, per_client: int, request, *, interval_s: float = 0.0
) -> tuple[list[float], float]:
    """`n_clients` threads each send `per_client` requests; (latencies, wall seconds).

    interval_s=0: back to back (closed loop, measures saturation). Otherwise each client
    sends one request every `interval_s` (phases spread evenly), like clients polling a job.
    """
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients + 1)
    errors: list[str] = []

    def client_loop(i: int) -> None:
        own: list[float] = []
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            first = time.perf_counter() + interval_s * i / n_clients
            for j in range(per_client):
                if interval_s:
                    time.sleep(max(0.0, first + j * interval_s - time.perf_counter()))
                start = time.perf_counter()
                response = request(http, i, j)
                own.append(time.perf_counter() - start)
                if response.status_code >= 400:
                    errors.append(f"{response.status_code} {response.text[:200]}")
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(n_clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return latencies, wall


def bench_api(args: argparse.Namespace) -> None:
    """Job status and submission latency under concurrent clients against real uvicorn."""
    from diffs.basemodel import resolve_base_path
    from tests.fixtures.services import (
        RedisServer,
        prepare_registry,
        service_env_for,
        settings_from_env,
        start_api_server,
        write_sentiment_jsonl,
    )

    work = Path(tempfile.mkdtemp(prefix="diffbank-bench-api-"))
    redis_server = RedisServer(work / "redis")
    redis_server.start()
    env = service_env_for(
        work / "data", redis_server.url, Path(resolve_base_path("all-MiniLM-L6-v2"))
    )
    settings = settings_from_env(env)
    key = prepare_registry(settings)
    server = start_api_server(env, work, workers=args.api_workers)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        import httpx

        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            dataset = http.post(
                "/v1/datasets",
                files={
                    "file": (
                        "bench.jsonl",
                        write_sentiment_jsonl(work / "bench.jsonl").read_bytes(),
                    )
                },
            ).json()
            seed_ids = [
                http.post(
                    "/v1/jobs", json={"task": f"seed{i}", "dataset_id": dataset["id"]}
                ).json()["id"]
                for i in range(50)
            ]

        def submit(http, i: int, j: int):
            return http.post(
                f"{server.url}/v1/jobs",
                headers=headers,
                json={"task": f"bench-{i}-{j}", "dataset_id": dataset["id"]},
            )

        def status(http, i: int, j: int):
            return http.get(
                f"{server.url}/v1/jobs/{seed_ids[(i + j) % len(seed_ids)]}", headers=headers
            )

        run_clients(args.clients, 5, status)  # warm-up: connections, caches
        n, every = args.clients, args.poll_interval_s
        rows = []
        samples, wall = run_clients(1, 200, status)
        rows.append(latency_row("status, 1 client back to back", samples, wall))
        samples, wall = run_clients(n, args.status_requests, status, interval_s=every)
        rows.append(latency_row(f"status, {n} clients polling every {every:g}s", samples, wall))
        samples, wall = run_clients(n, args.status_requests, status)
        rows.append(latency_row(f"status, {n} clients back to back", samples, wall))
        samples, wall = run_clients(1, 40, submit)
        rows.append(latency_row("submit, 1 client back to back", samples, wall))
        samples, wall = run_clients(n, args.submit_requests, submit, interval_s=every)
        rows.append(latency_row(f"submit, {n} clients every {every:g}s", samples, wall))
        samples, wall = run_clients(n, args.submit_requests, submit)
        rows.append(latency_row(f"submit, {n} clients back to back", samples, wall))
        print_table(
            f"API latency, {args.clients} concurrent clients, uvicorn workers={args.api_workers}, "
            f"SQLite + file store + Redis ({MACHINE_NOTE})",
            [
                "GET /v1/jobs/{id} (status) / POST /v1/jobs (submit + enqueue)",
                "n",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "req/s",
            ],
            rows,
        )
        print("goal: status p99 <= 50 ms")
    finally:
        server.stop()
        redis_server.stop()


# ---------------------------------------------------------------- serving


def random_sparse_diff(
    base: Any, head_shapes: dict[str, tuple[int, ...]], *, density: float, seed: int
) -> Any:
    """A diff with `density` of every base tensor's entries at random positions, random values."""
    import torch

    from diffs.build import make_meta_consistent
    from diffs.types import ArtifactMeta, SparseDiff

    generator = torch.Generator().manual_seed(seed)
    indices, values, shapes = {}, {}, {}
    for name, param in sorted(base.encoder.named_parameters()):
        k = max(1, round(density * param.numel()))
        chosen = torch.randperm(param.numel(), generator=generator)[:k].sort().values
        noise = torch.randn(k, generator=generator) * 0.01
        indices[name] = chosen
        values[name] = (noise + noise.sign() * 1e-3).to(torch.float16)
        shapes[name] = tuple(param.shape)
    head = {
        name: torch.randn(shape, generator=generator) * 0.02 for name, shape in head_shapes.items()
    }
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type="classification",
        label_names=["negative", "positive"],
        max_length=64,
        extra={"synthetic": "random sparse diff for benchmarking"},
    )
    return make_meta_consistent(SparseDiff(indices, values, shapes, head, meta))


def bench_serving(args: argparse.Namespace) -> None:
    """Task-switch cost and throughput with many tasks on one base vs one merged task vs full checkpoints."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from diffs.apply import apply_diff
    from diffs.basemodel import build_model, load_base, resolve_base_path
    from diffs.read import loads_artifact
    from diffs.write import dumps_artifact

    torch.manual_seed(0)
    torch.set_num_threads(
        args.threads
    )  # 1: robust on a shared machine (no thread oversubscription)
    base_path = resolve_base_path("all-MiniLM-L6-v2")
    base = load_base(base_path)
    # The apply/revert path on its own (api/serving.py now serves mixed batches instead):
    # one classification model on the base, each request applies its diff in place.
    model = build_model(base, task_type="classification", num_labels=2).eval()
    head_shapes = base.head_shapes("classification", 2)
    blobs = []
    for i in range(args.tasks):
        diff = random_sparse_diff(base, head_shapes, density=args.density, seed=i)
        blobs.append(dumps_artifact(diff))
    nnz = loads_artifact(blobs[0]).nnz
    batch = SENTENCES[: args.batch]

    # Decoding an artifact (a cache miss): bytes -> validated SparseDiff.
    decode_s = []
    for blob in blobs[:10]:
        start = time.perf_counter()
        loads_artifact(blob, expected_fingerprint=base.fingerprint, base_shapes=base.shapes)
        decode_s.append(time.perf_counter() - start)
    diffs = [loads_artifact(b, expected_fingerprint=base.fingerprint) for b in blobs]
    encoded = base.encode(batch, None, max_length=64)
    params = dict(model.named_parameters())

    def use_head(head: dict) -> None:
        with torch.no_grad():
            for name, tensor in head.items():
                params[name].copy_(tensor)

    def request(task: int) -> None:
        use_head(diffs[task].head)
        applied = apply_diff(model.base_model, diffs[task])
        try:
            with torch.inference_mode():
                model(**encoded).logits.float().argmax(-1).tolist()
        finally:
            applied.revert()

    for task in range(args.tasks):  # warm up
        request(task)

    # Switch cost alone: revert the previous task's diff, apply the next (round robin).
    encoder = model.base_model
    switch_s, switch_cpu_s = [], []
    applied = apply_diff(encoder, diffs[0])
    for r in range(args.rounds * args.tasks):
        nxt = diffs[(r + 1) % args.tasks]
        start, cpu_start = time.perf_counter(), time.process_time()
        applied.revert()
        applied = apply_diff(encoder, nxt)
        switch_s.append(time.perf_counter() - start)
        switch_cpu_s.append(time.process_time() - cpu_start)
    applied.revert()

    # Throughput, three modes interleaved block by block so that load drift on a shared
    # machine hits all of them alike; each block is `tasks` requests.
    def round_robin() -> None:
        for task in range(args.tasks):
            request(task)

    def one_task_same_path() -> None:
        for _ in range(args.tasks):
            request(0)

    def one_task_merged() -> None:
        use_head(diffs[0].head)
        merged = apply_diff(encoder, diffs[0])
        try:
            with torch.inference_mode():
                for _ in range(args.tasks):
                    model(**encoded).logits.float().argmax(-1).tolist()
        finally:
            merged.revert()

    modes = {
        f"round robin over {args.tasks} tasks (apply/forward/revert)": round_robin,
        "one task, same path (apply/forward/revert)": one_task_same_path,
        "one task merged once (forward only)": one_task_merged,
    }
    per_request: dict[str, list[float]] = {name: [] for name in modes}
    cpu_per_request: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            per_request[name].append((time.perf_counter() - start) / args.tasks)
            cpu_per_request[name].append((time.process_time() - cpu_start) / args.tasks)
    medians = {name: statistics.median(times) for name, times in per_request.items()}
    cpu_medians = {name: statistics.median(times) for name, times in cpu_per_request.items()}
    merged_name = "one task merged once (forward only)"
    n_requests = args.rounds * args.tasks

    # The alternative: a fully finetuned checkpoint per task, loaded at each switch.
    with tempfile.TemporaryDirectory(prefix="diffbank-bench-full-") as tmp:
        full = build_model(base, task_type="classification", num_labels=2)
        full.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        full_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        load_s = []
        for _ in range(args.full_loads):
            start = time.perf_counter()
            AutoModelForSequenceClassification.from_pretrained(tmp).eval()
            load_s.append(time.perf_counter() - start)

    print_table(
        f"Serving {args.tasks} tasks on one all-MiniLM-L6-v2 (N={base.n_params:,}), random sparse "
        f"diffs at density {args.density} (nnz={nnz:,} per task), batch of {len(batch)} sentences, "
        f"{n_requests} requests per mode in {args.rounds} interleaved blocks, torch threads "
        f"{torch.get_num_threads()} ({MACHINE_NOTE})",
        [
            "mode",
            "wall ms/request",
            "CPU ms/request",
            "requests/s (wall)",
            "vs merged (wall)",
            "vs merged (CPU)",
        ],
        [
            [
                name,
                m * 1000,
                cpu_medians[name] * 1000,
                1 / m,
                medians[merged_name] / m,
                cpu_medians[merged_name] / cpu_medians[name],
            ]
            for name, m in medians.items()
        ],
    )
    print_table(
        "Task switch cost",
        ["what", "n", "p50 ms", "p99 ms", "mean ms"],
        [
            [
                "revert + apply sparse diff (in place), wall",
                len(switch_s),
                percentile([s * 1000 for s in switch_s], 50),
                percentile([s * 1000 for s in switch_s], 99),
                statistics.mean(switch_s) * 1000,
            ],
            [
                "revert + apply sparse diff (in place), CPU",
                len(switch_cpu_s),
                percentile([s * 1000 for s in switch_cpu_s], 50),
                percentile([s * 1000 for s in switch_cpu_s], 99),
                statistics.mean(switch_cpu_s) * 1000,
            ],
            [
                "decode artifact (LRU miss, once per task)",
                len(decode_s),
                percentile([s * 1000 for s in decode_s], 50),
                percentile([s * 1000 for s in decode_s], 99),
                statistics.mean(decode_s) * 1000,
            ],
            [
                f"from_pretrained full finetuned checkpoint ({full_bytes / 2**20:.1f} MiB)",
                len(load_s),
                percentile([s * 1000 for s in load_s], 50),
                percentile([s * 1000 for s in load_s], 99),
                statistics.mean(load_s) * 1000,
            ],
        ],
    )
    print(f"artifact bytes per task: {len(blobs[0]):,} (full checkpoint {full_bytes:,})")
    print("goals: switch <= 2 ms; round-robin throughput >= 80% of serving a single task")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["api", "serving", "all"], default="all")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--status-requests", type=int, default=20, help="per client")
    parser.add_argument("--submit-requests", type=int, default=4, help="per client")
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--poll-interval-s", type=float, default=1.0)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved blocks per mode")
    parser.add_argument("--full-loads", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for serving")
    args = parser.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.part in ("api", "all"):
        bench_api(args)
    if args.part in ("serving", "all"):
        bench_serving(args)


if __name__ == "__main__":
    main()
