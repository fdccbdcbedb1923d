"""The embedded stack's supervisor: a dead Redis comes back on its port, with its queue."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from cli.embedded import RESTART_LIMIT, EmbeddedStack, wait_for_port
from settings import Settings

pytestmark = pytest.mark.services


@pytest.fixture
def stack(tmp_path):
    """A stack of Redis alone (no API, worker or beat), its signal handlers undone after."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = EmbeddedStack(Settings(data_dir=tmp_path / "data", redis_url=""))
    try:
        stack.start(api=False, worker=False, beat=False)
        yield stack
    finally:
        stack.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _kill(stack: EmbeddedStack, name: str) -> None:
    proc = stack.processes[name]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_killed_redis_is_restarted_on_its_port_with_the_messages_it_held(stack):
    url = stack.env["DIFFBANK_REDIS_URL"]
    client = redis.Redis.from_url(url)
    client.rpush("train", b"a queued job")
    client.execute_command("BGREWRITEAOF")  # on disk now, whatever the fsync timing
    time.sleep(1.0)
    _kill(stack, "redis")
    assert stack.failed() == ["redis"]

    assert stack.supervise() == []
    wait_for_port(stack.redis_port, timeout_s=20)
    assert redis.Redis.from_url(url).lrange("train", 0, -1) == [b"a queued job"]
    assert stack.failed() == []


def test_a_redis_that_keeps_dying_ends_the_stack_instead_of_looping(stack):
    for _ in range(RESTART_LIMIT):
        _kill(stack, "redis")
        assert stack.supervise() == []
        wait_for_port(stack.redis_port, timeout_s=20)
    _kill(stack, "redis")
    assert stack.supervise() == ["redis"]
