"""Property-based: requests generated from the OpenAPI schema never get a 5xx answer.

Schemathesis generates valid (positive) and invalid (negative) requests for every operation
of the app's own schema, sent in-process over ASGI with an admin key. The number of examples
is bounded (and shrinking is off) so the module stays well under ~40 s on 2 cores.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api_support import SENTIMENT_ROWS
from tests.api_support import world as world  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.services

EXAMPLES = {GenerationMode.POSITIVE: 6, GenerationMode.NEGATIVE: 4}


def test_generated_requests_never_get_a_server_error(world):
    world.upload_ok("admin", SENTIMENT_ROWS)
    world.publish_version("admin", "fuzz-task", seed=7)
    schema = schemathesis.openapi.from_asgi("/openapi.json", world.app)
    headers = world.headers("admin")
    failures: list[str] = []
    statuses: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        for mode, examples in EXAMPLES.items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def send(case):
                response = case.call(headers=headers)
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} "
                        f"-> {response.status_code}: {response.text[:300]}"
                    )
                    return
                content_type = (response.headers.get("content-type") or [""])[0]
                if response.status_code >= 400 and content_type.startswith("application/json"):
                    error = response.json()["error"]
                    if not (error["code"] and error["message"]):
                        failures.append(f"{case.method} {case.formatted_path}: bare error {error}")

            try:
                send()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no inputs)
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n".join(failures[:20])
    assert len(statuses) >= len(operations) * EXAMPLES[GenerationMode.POSITIVE]
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
