"""The HTTP/1.1 protocol the API server runs: uvicorn's h11 one, firmer with hostile clients.

- A request line or header block over the head limit (uvicorn's `h11_max_incomplete_event_size`,
  16 KiB by default) gets 414 or 431, whichever way the network cut it into reads. Plain
  uvicorn accepts it if it came in one read, and otherwise answers a bare 400 and closes while
  the client is still sending, which the client sees as a connection reset. Every error answer
  here half-closes and reads (and drops) what is still coming, so the answer arrives.
- The request head must arrive within `api_header_timeout_s` of its first byte (or of the
  connection opening): a client trickling headers gets 408 and the connection closes.
- A request body may pause at most `api_body_idle_timeout_s` between bytes: a stalled upload
  is cut (the route sees the client gone and keeps nothing); a slow, steady one finishes.

Run it with `uvicorn --http api.http_protocol:GuardedH11Protocol` (`diffbank api` does).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 2.0  # how long an error answer waits for the client to stop sending


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with 414/431/408 answers and time limits on slow clients."""

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        from settings import get_settings

        super().__init__(config, *args, **kwargs)
        self.max_head_bytes = (
            config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        )
        settings = get_settings()
        self.header_timeout_s = settings.api_header_timeout_s
        self.body_idle_timeout_s = settings.api_body_idle_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._draining = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request head."""
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clocks."""
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed h11 (or drop the bytes after an error answer), then reset the clocks."""
        if self._draining:
            return
        refusal = self._oversized_head(data) if self.conn.their_state is h11.IDLE else None
        if refusal is not None:
            self._unset_keepalive_if_required()
            self._answer_and_close(*refusal)
            return
        super().data_received(data)
        if self._draining or self.transport.is_closing():
            return
        self._track_progress()

    def on_response_complete(self) -> None:
        """The next request's head timer starts with its first byte (keep-alive until then)."""
        super().on_response_complete()
        self._cancel_timers()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: 414 or 431 when the head was too long, else 400."""
        status, message = self._error_status(msg)
        self._answer_and_close(status, message)

    def _error_status(self, msg: str) -> tuple[int, str]:
        return self._oversized_head(b"") or (400, msg)

    def _oversized_head(self, data: bytes) -> tuple[int, str] | None:
        """414 or 431 when the request head buffered with `data` is over the size limit.

        Checked on every read, not only on h11's incomplete-head limit, so the answer does
        not depend on how the network cut the request into reads.
        """
        buffered = self.conn.trailing_data[0] + data
        end = buffered.find(b"\r\n\r\n")
        head = buffered if end < 0 else buffered[:end]
        if len(head) <= self.max_head_bytes:
            return None
        line_end = head.find(b"\r\n")
        if line_end < 0 or line_end > self.max_head_bytes:
            return 414, "the request line (the URL with its query string) is too long"
        return 431, "the request headers are too large"

    def _answer_and_close(self, status: int, message: str) -> None:
        """Answer with `status` and a plain-text reason, then half-close and drain."""
        self._cancel_timers()
        body = message.encode("ascii")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            output = self.conn.send(h11.Response(status_code=status, headers=headers))
            output += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # a response already started: nothing more to say
            self.transport.close()
            return
        self.transport.write(output)
        self._drain_then_close()

    def _drain_then_close(self) -> None:
        """Stop writing and drop what still arrives, so the answer is not lost in a reset."""
        self._draining = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _track_progress(self) -> None:
        """Arm the head timer while a head is awaited, the body timer while a body is."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._head_timer is None:
                self._arm_head_timer()
            return
        self._cancel_head_timer()
        if state is h11.SEND_BODY:
            self._cancel_body_timer()
            self._body_timer = self.loop.call_later(self.body_idle_timeout_s, self._body_stalled)
        else:
            self._cancel_body_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _head_too_slow(self) -> None:
        """The head did not arrive in time: 408 if some of it came, else just close."""
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:
            self._answer_and_close(408, "the request headers took too long to arrive")
        else:
            self.transport.close()

    def _body_stalled(self) -> None:
        """No body byte for `body_idle_timeout_s`: cut the request (unless we stopped reading)."""
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # the app is behind, not the client: wait for it
            self._body_timer = self.loop.call_later(self.body_idle_timeout_s, self._body_stalled)
            return
        self.logger.info("closing a connection whose request body stalled")
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
