"""HEAD wherever GET is answered: the GET's status and headers, no body (RFC 9110 9.3.2).

FastAPI registers GET routes for GET only, so HEAD would answer 405. This middleware runs a
HEAD request as a GET and passes the response start (status, headers, Content-Length and
ETag included) through unchanged, then ends the response without a body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """ASGI middleware: answer HEAD as the same GET would, minus the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run HEAD as GET on a copy of the scope (the server still knows it was HEAD)."""
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def send_headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] != "http.response.body":
                await send(message)
            elif not ended and not message.get("more_body", False):
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
