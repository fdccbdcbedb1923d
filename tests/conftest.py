"""Shared pytest configuration: fixture plugins live in tests/fixtures/."""

import os

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.backends",  # sqlite/postgres engines, file/S3 object stores
    "tests.fixtures.services",  # redis server, celery worker process, API server
]


def pytest_sessionstart(session):
    """Build the serving kernel's C++ extension once, before any server process needs it."""
    from serving.kernels import compiled

    compiled.extension()
