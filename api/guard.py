"""The gate in front of every route: who is calling, and how many body bytes they may send.

Both are decided before any route reads a body, so a request without a valid key, or with a
body over its limit, costs the server a header lookup and nothing more: no parse, no row,
no blob, no queued job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from api.uploads import FRAMING_ALLOWANCE_BYTES
from serving.stages import mark, since

log = logging.getLogger(__name__)

CHALLENGE = (b"www-authenticate", b"Bearer")
UPLOAD_ROUTES = frozenset({("POST", "/v1/datasets")})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's tenant and its scopes."""

    tenant_id: int
    tenant_name: str
    scopes: frozenset[str]

    def has_scope(self, scope: str) -> bool:
        """`admin` grants every scope; otherwise the scope must be on the key."""
        return scope in self.scopes or "admin" in self.scopes


class DuplicateAuthorization(ValueError):
    """More than one Authorization header: which one counts would depend on who reads it."""


def bearer_key(scope: Scope) -> str | None:
    """The key of the one `Authorization: Bearer KEY` header, or None."""
    values = [value for name, value in scope.get("headers", []) if name == b"authorization"]
    if len(values) > 1:
        raise DuplicateAuthorization("send one Authorization header")
    if not values:
        return None
    kind, _, key = values[0].decode("latin-1").partition(" ")
    return key.strip() or None if kind.lower() == "bearer" else None


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return value.decode("latin-1")
    return None


def body_limit(scope: Scope, *, max_json_bytes: int, max_upload_bytes: int) -> int:
    """The most body bytes a request may send: upload routes the file limit, the rest JSON's
    (whatever content type a caller claims)."""
    if (scope["method"], scope["path"]) in UPLOAD_ROUTES:
        return max_upload_bytes + FRAMING_ALLOWANCE_BYTES
    return max_json_bytes


class RequestGuard:
    """ASGI middleware: authenticate `/v1` (and `/metrics`) requests and cap body sizes first.

    A body that grows past its limit while streaming is cut: the route sees the client gone
    (and so creates nothing), and the caller gets 413 instead of the route's answer.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        lookup: Callable[[str], Principal | None],
        max_json_bytes: int,
        peek: Callable[[str], Principal | None] | None = None,
        max_upload_bytes: int,
        guarded_prefixes: tuple[str, ...] = ("/v1/",),
        keyless_clients: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.app = app
        self.lookup = lookup  # may block (database): run in a worker thread
        self.peek = peek  # a cached principal or None, without blocking: run on the event loop
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes
        self.guarded_prefixes = guarded_prefixes
        self.keyless_clients = keyless_clients or {}  # path -> client hosts needing no key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 401/413 before the app runs, or run it with a byte-counting receive."""
        if scope["type"] != "http" or not scope["path"].startswith(self.guarded_prefixes):
            await self.app(scope, receive, send)
            return
        client_host = (scope.get("client") or ("", 0))[0]
        if client_host in self.keyless_clients.get(scope["path"], ()):
            await self.app(scope, receive, send)
            return
        try:
            key = bearer_key(scope)
        except DuplicateAuthorization as exc:
            await _answer(send, 400, "duplicate_authorization", str(exc), "Authorization")
            return
        if key is None:
            await _answer(send, 401, "missing_key", MISSING_KEY, "Authorization", CHALLENGE)
            return
        start = mark()
        principal = self.peek(key) if self.peek is not None else None
        if principal is None:
            principal, cpu = await anyio.to_thread.run_sync(_cpu_timed, self.lookup, key)
            auth_time = (cpu, since(start)[1])
        else:
            auth_time = since(start)
        if principal is None:
            await _answer(send, 401, "invalid_key", _INVALID_KEY, "Authorization", CHALLENGE)
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["auth_time"] = auth_time  # (CPU, wall) seconds, for the predict stage stats

        limit = body_limit(
            scope, max_json_bytes=self.max_json_bytes, max_upload_bytes=self.max_upload_bytes
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, "too_large", _too_large(limit), "body")
            return
        await self._run_counted(scope, receive, send, limit)

    async def _run_counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        cut = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut:
                return  # the 413 below answers instead of whatever the route made of it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except ClientDisconnect:
            if not cut:  # the client left mid-request: one line, not a traceback
                log.info("client left during %s %s", scope["method"], scope["path"])
                return
        if cut and not started:
            await _answer(send, 413, "too_large", _too_large(limit), "body")


def _cpu_timed(lookup: Callable[[str], Principal | None], key: str):
    """`lookup(key)` and the CPU seconds this thread spent on it."""
    start = mark()
    return lookup(key), since(start)[0]


MISSING_KEY = "an API key is required: send `Authorization: Bearer KEY`"
_INVALID_KEY = "the API key is not valid (unknown or revoked)"


def _too_large(limit: int) -> str:
    return f"the request body is over this route's limit of {limit} bytes"


async def _answer(
    send: Send,
    status: int,
    code: str,
    message: str,
    field: str | None,
    *extra_headers: tuple[bytes, bytes],
) -> None:
    body = json.dumps(error_body(code, message, field)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
