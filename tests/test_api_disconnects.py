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
