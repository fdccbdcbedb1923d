"""Dynamic batching behind the predict route: concurrent requests of different tenants' tasks share
mixed batches and answer as if alone; a full queue answers 503 with Retry-After; a failing request
fails alone; the decoded-diff cache is visible in /metrics."""

from __future__ import annotations

import threading
import time

import pytest

from serving.batcher import DynamicBatcher
from serving.engine import PredictionInputError, Predictor
from tests.api_support import make_world, random_artifact
from tests.api_support import world as world  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.services

TEXTS = ["a wonderful, warm film", "dull and far too long", "fine"]


def _post(world, who, task, inputs):
    return world.client.post(
        f"/v1/tasks/{task}/predict", headers=world.headers(who), json={"inputs": inputs}
    )


def _labels(answer):
    return [p["label"] for p in answer["predictions"]]


def _scores(answer):
    return [p["score"] for p in answer["predictions"]]


def _metrics(world) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = world.client.get("/metrics", headers=world.headers("admin")).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def _wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_concurrent_requests_of_two_tenants_share_batches_and_answer_as_if_alone(world):
    world.publish_version("alice", "alice-task", seed=201)
    world.publish_version("bob", "bob-task", seed=202, labels=("x", "y", "z"))
    who_task = [("alice", "alice-task"), ("bob", "bob-task")]
    alone = {task: _post(world, who, task, TEXTS).json() for who, task in who_task}
    batcher: DynamicBatcher = world.app.state.batcher
    predictor: Predictor = world.app.state.predictor
    batches, requests = batcher.batches, batcher.batched_requests
    answers: list[tuple[str, int, dict]] = []

    def ask(who, task):
        response = _post(world, who, task, TEXTS)
        answers.append((task, response.status_code, response.json()))

    threads = [threading.Thread(target=ask, args=pair) for pair in who_task * 4]
    with predictor.run_lock:  # the runner waits, so the requests pile up into one batch
        for thread in threads:
            thread.start()
        _wait_until(lambda: batcher.depth + batcher.batched_requests - requests >= len(threads))
    for thread in threads:
        thread.join()
    assert len(answers) == len(threads)
    for task, status, answer in answers:  # a bigger batch may round the base product differently
        assert status == 200
        assert _labels(answer) == _labels(alone[task])
        assert _scores(answer) == pytest.approx(_scores(alone[task]), abs=1e-5)
    assert batcher.batched_requests - requests == len(threads)
    assert batcher.batches - batches < len(threads)  # some requests shared a forward
    assert {p["label"] for p in alone["bob-task"]["predictions"]} <= {"x", "y", "z"}
    assert _post(world, "alice", "bob-task", TEXTS).status_code == 404


def test_a_bad_input_gets_its_422_and_does_not_poison_the_batch(world):
    world.publish_version(
        "alice", "pairs", seed=203, task_type="pair-classification", labels=("no", "yes")
    )
    world.publish_version("alice", "singles", seed=204)
    good = _post(world, "alice", "singles", TEXTS).json()
    results: dict[str, tuple[int, dict]] = {}

    def ask(task, inputs):
        response = _post(world, "alice", task, inputs)
        results[task] = (response.status_code, response.json())

    threads = [
        threading.Thread(target=ask, args=("pairs", TEXTS)),  # pairs task given single texts
        threading.Thread(target=ask, args=("singles", TEXTS)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["pairs"][0] == 422
    assert results["pairs"][1]["error"]["code"] == "invalid_inputs"
    assert results["singles"] == (200, good)


def test_a_request_failing_inside_a_batch_fails_alone(tiny_base_dir):
    predictor = Predictor()
    base = str(tiny_base_dir)
    data = {
        name: random_artifact(
            tiny_base_dir, seed=seed, task_type="classification", labels=("n", "p"), density=0.05
        )
        for name, seed in (("a", 1), ("b", 2))
    }
    good = [predictor.resolve(base, name, lambda name=name: data[name]) for name in data]
    headless = predictor.resolve(base, "a", lambda: data["a"])
    headless = type(headless)(headless.meta, headless.decoded, None, None, headless.nbytes)
    expected = [predictor.run_batch([predictor.prepare(base, [r], TEXTS)])[0] for r in good]
    batcher = DynamicBatcher(predictor, max_wait_s=0.05)
    try:
        with predictor.run_lock:
            futures = [
                batcher.submit(predictor.prepare(base, [good[0]], TEXTS)),
                batcher.submit(predictor.prepare(base, [headless], TEXTS)),
                batcher.submit(predictor.prepare(base, [good[1]], TEXTS)),
            ]
        assert futures[0].result(30) == expected[0]
        assert futures[2].result(30) == expected[1]
        with pytest.raises(PredictionInputError, match="no task head"):
            futures[1].result(30)
    finally:
        batcher.close()


def test_a_batch_closes_at_its_row_and_request_limits(tiny_base_dir):
    predictor = Predictor()
    base = str(tiny_base_dir)
    data = random_artifact(
        tiny_base_dir, seed=1, task_type="classification", labels=("n", "p"), density=0.05
    )
    resident = predictor.resolve(base, "a", lambda: data)
    for limits, sizes in (({"max_rows": 6}, [2, 2, 1]), ({"max_requests": 3}, [3, 2])):
        batcher = DynamicBatcher(predictor, max_wait_s=1.0, **limits)
        try:
            with predictor.run_lock:  # everything is queued before the first batch runs
                futures = [
                    batcher.submit(predictor.prepare(base, [resident], TEXTS)) for _ in range(5)
                ]
                _wait_until(lambda b=batcher: b.batches == 1)
            assert all(len(f.result(30)) == len(TEXTS) for f in futures)
            assert batcher.batches == len(sizes) and batcher.batched_requests == 5
        finally:
            batcher.close()


def test_a_full_queue_answers_503_with_retry_after(tmp_path, redis_server, tiny_base_dir):
    small = make_world(
        tmp_path, redis_server.url, tiny_base_dir, serving_queue_size=1, serving_retry_after_s=2
    )
    small.publish_version("alice", "busy", seed=205)
    assert _post(small, "alice", "busy", TEXTS).status_code == 200  # base loaded, diff resident
    batcher: DynamicBatcher = small.app.state.batcher
    predictor: Predictor = small.app.state.predictor
    statuses: list[int] = []
    done = batcher.batches

    def ask():
        statuses.append(_post(small, "alice", "busy", TEXTS).status_code)

    with predictor.run_lock:
        running = threading.Thread(target=ask)
        running.start()
        _wait_until(lambda: batcher.batches > done)  # taken by the runner, which now waits
        queued = threading.Thread(target=ask)
        queued.start()
        _wait_until(lambda: batcher.depth == 1)
        refused = _post(small, "alice", "busy", TEXTS)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "2"
        assert refused.json()["error"]["code"] == "overloaded"
    running.join()
    queued.join()
    assert statuses == [200, 200]
    assert _metrics(small)["diffbank_serving_rejected_total"] == 1


def test_metrics_report_the_decoded_diff_cache(world):
    world.publish_version("alice", "metered", seed=206)
    for _ in range(2):
        assert _post(world, "alice", "metered", TEXTS).status_code == 200
    metrics = _metrics(world)
    stats = world.app.state.predictor.cache_stats()
    assert stats["hits"] >= 1 and stats["misses"] >= 1 and stats["bytes"] > 0
    for name in ("hits", "misses", "evictions"):
        assert metrics[f"diffbank_serving_cache_{name}_total"] == stats[name]
    assert metrics["diffbank_serving_cache_resident_bytes"] == stats["bytes"]


def test_app_shutdown_stops_the_batch_runner(tmp_path, redis_server, tiny_base_dir):
    from fastapi.testclient import TestClient

    own = make_world(tmp_path, redis_server.url, tiny_base_dir)
    own.publish_version("alice", "shutdown", seed=207)
    batcher: DynamicBatcher = own.app.state.batcher
    with TestClient(own.app) as client:  # runs the app's lifespan
        answer = client.post(
            "/v1/tasks/shutdown/predict", headers=own.headers("alice"), json={"inputs": TEXTS}
        )
        assert answer.status_code == 200
        runner = batcher._thread
        assert runner is not None and runner.is_alive()
    assert not runner.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(None)  # type: ignore[arg-type]  (refused before it is looked at)
