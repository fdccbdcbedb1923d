"""Against a real uvicorn: a client that leaves mid-upload costs one log line and leaves
nothing behind (no dataset row, no temp file)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from registry import catalog
from registry.db import make_engine, make_session_factory, upgrade

pytestmark = pytest.mark.services


def test_a_client_that_leaves_mid_upload_is_one_log_line_and_nothing_is_kept(
    service_env, api_server
):
    upgrade(service_env["DIFFBANK_DATABASE_URL"])
    sessions = make_session_factory(make_engine(service_env["DIFFBANK_DATABASE_URL"]))
    with sessions() as session:
        tenant = catalog.get_or_create_tenant(session, name="leaver")
        _, key = catalog.create_api_key(session, tenant_id=tenant.id, scopes=["read", "submit"])
    server = api_server(service_env)
    url = urlparse(server.url)

    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    partial = head + b'{"text": "a fine film", "label": "pos"}\n' * 200
    request = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: {url.hostname}\r\n"
        f"Authorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(partial) * 4}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(request + partial)
        time.sleep(0.5)  # the server is now reading the body that will never end
    time.sleep(1.0)

    listed = httpx.get(
        f"{server.url}/v1/datasets", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert listed.status_code == 200 and listed.json()["items"] == []
    uploads = Path(service_env["DIFFBANK_DATA_DIR"]) / "uploads"
    assert list(uploads.glob("upload-*")) == []
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def _key(service_env, tenant: str) -> str:
    """An API key of a fresh tenant in the service database."""
    upgrade(service_env["DIFFBANK_DATABASE_URL"])
    sessions = make_session_factory(make_engine(service_env["DIFFBANK_DATABASE_URL"]))
    with sessions() as session:
        row = catalog.get_or_create_tenant(session, name=tenant)
        _, key = catalog.create_api_key(session, tenant_id=row.id, scopes=["read", "submit"])
    return key


# (id, path, extra headers, status): the head is over h11's 16 KiB limit, or an ordinary one.
OVERSIZED_HEADS = [
    ("query_string_of_120_kb", "/healthz?q=" + "x" * 120_000, {}, 414),
    ("one_header_of_64_kb", "/healthz", {"X-Big": "y" * 64_000}, 431),
    ("500_headers", "/healthz", {f"X-H{i}": "z" * 100 for i in range(500)}, 431),
    ("ordinary_query_and_headers", "/healthz?q=short", {"X-Small": "ok"}, 200),
]


def test_an_oversized_request_head_gets_414_or_431_not_a_reset(service_env, api_server):
    upgrade(service_env["DIFFBANK_DATABASE_URL"])
    server = api_server(service_env)
    for name, path, headers, status in OVERSIZED_HEADS:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        received, _ = _exchange(server.url, [(0.0, request)], wait_s=10)  # a reset: nothing
        assert received.startswith(f"HTTP/1.1 {status} ".encode()), (name, received[:200])
    assert "Traceback" not in server.log()


def _exchange(server_url: str, pieces: list[tuple[float, bytes]], wait_s: float):
    """Send each piece after its delay (stopping if the server closed); what came back, and
    how long until the server closed the connection (None: still open `wait_s` after the
    last piece)."""
    url = urlparse(server_url)
    received = b""
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port)) as sock:
        try:
            for delay, data in pieces:
                time.sleep(delay)
                sock.sendall(data)
        except OSError:  # closed by the server meanwhile
            pass
        sock.settimeout(wait_s)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, None
        except OSError:
            pass
    return received, time.monotonic() - started


SLOW = 1.5  # the server's header and body-idle timeouts in this test


def _slow_cases(key: str, host: str) -> list:
    post = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n"
    )
    body = b'{"task": "t", "dataset_id": 424242}'
    steady = [(0.0, post.replace("{n}", str(len(body))).encode())]
    steady += [(0.6, body[i : i + 5]) for i in range(0, len(body), 5)]  # ~4 s in all
    head = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode()
    return [
        # (id, pieces, answer starts with, closed by the server)
        ("sends_nothing", [], b"", True),
        ("headers_trickled", [(0.0, head)] + [(0.5, b"X")] * 8, b"HTTP/1.1 408", True),
        ("headers_in_two_pieces", [(0.0, head), (0.5, b"\r\n")], b"HTTP/1.1 200", False),
        ("body_stalls", [(0.0, post.replace("{n}", "100").encode() + body[:10])], b"", True),
        ("body_slow_but_steady", steady, b"HTTP/1.1 404", False),
    ]


def test_slow_clients_are_cut_and_slow_but_steady_ones_finish(service_env, api_server):
    key = _key(service_env, "slowpoke")
    env = {
        **service_env,
        "DIFFBANK_API_HEADER_TIMEOUT_S": str(SLOW),
        "DIFFBANK_API_BODY_IDLE_TIMEOUT_S": str(SLOW),
    }
    server = api_server(env)
    for name, pieces, answer, closed in _slow_cases(key, urlparse(server.url).hostname):
        received, closed_after = _exchange(server.url, pieces, wait_s=SLOW + 3)
        assert received.startswith(answer), (name, received[:200])
        # The server closes within SLOW + 3 s of the client's last byte, or keeps it open.
        assert (closed_after is not None) == closed, (name, closed_after)
    assert "Traceback" not in server.log()
