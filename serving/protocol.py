"""uvicorn's httptools protocol with the bounds a public server needs.

uvicorn (with httptools) accepts a request head of any size, waits forever for a head or a
body that never completes, and keeps idle connections that never send a byte: a 100 MB
header stalled every other client for seconds, and 500 slowloris connections stayed open.
This subclass adds, per connection (settings in pipeline/config.py, `MLOPS_*`):

- a head larger than `max_header_bytes` or with more than `max_headers` lines: 431;
- a head not complete within `header_timeout_s` of the connection opening or the previous
  response (idle connections included): closed;
- a body that receives nothing for `body_timeout_s`: 408 and closed;
- a body over the app's limit (413 from serving/middleware.py): the rest is read and
  dropped, up to `linger_bytes`, so clients that send the whole body before reading
  (urllib, requests) read the 413 instead of a connection reset; beyond that it is closed.

It also sends each answer in one write: uvicorn writes a response's head and its body as
two system calls (two TCP segments, two wake-ups of the client), and on loopback each send
costs the kernel's whole TCP path; `_OneWrite` joins what is written within one turn of the
event loop.

And it counts the requests in flight on the process's connections (`requests_in_flight`):
from the moment their head is read, before their handler has run at all, until their answer
is complete. The log writer holds a small group for the next one only while other answers
are on their way (serving/runtime.py, `answers_coming`), and at 1 x 8 the requests that
will make the next group are nearly always read but not yet in a handler when a group is
committed: the micro-batcher's own count missed them, and 28 of 4,000 groups were held.

`mlops serve` passes it to uvicorn as `http="serving.protocol:GuardedHttpTools"`.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeline.config import get_settings

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_in_flight = 0  # requests read and not yet answered, on this process's connections


def requests_in_flight() -> int:
    """Requests whose head was read and whose answer is not complete (event loop only)."""
    return _in_flight


def _count(delta: int) -> None:
    global _in_flight
    _in_flight += delta


class _OneWrite:
    """The connection's transport, with the writes made within one turn of the event loop
    joined into one (flushed by a callback at the end of the turn, or before anything that
    ends the stream); everything else is the transport's own."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport, loop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class GuardedHttpTools(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        s = get_settings()
        self._max_head, self._max_headers = s.max_header_bytes, s.max_headers
        self._head_timeout, self._body_timeout = s.header_timeout_s, s.body_timeout_s
        self._linger = s.linger_bytes
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._dropped = 0
        self._declared = 0
        self._draining = False
        self._client_close = False
        self._counted = False  # this connection's request is in `requests_in_flight`
        self._timer: asyncio.TimerHandle | None = None

    # --- timers -----------------------------------------------------------------------------

    def _arm(self, delay: float, on_fire) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, on_fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(408, "request head not complete in time")
            else:
                self.transport.close()  # an idle connection: nothing to answer

    def _body_stalled(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            if cycle.response_complete:
                self.transport.close()  # lingering after a 413: enough
            else:
                self._refuse(408, "request body stalled")

    def _refuse(self, status: int, message: str) -> None:
        body = message.encode()
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        self.transport.write(
            head
            + b"content-type: text/plain; charset=utf-8\r\n"
            + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        # Closing with unread bytes would make the kernel send a reset that can destroy
        # the answer before the client reads it: end our side, drop what still arrives
        # (bounded by linger_bytes and a second), then close.
        self._draining = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(1.0, self.transport.close)

    # --- protocol ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _OneWrite(transport, self.loop)  # type: ignore[assignment]
        self._arm(self._head_timeout, self._head_expired)

    def _answered(self) -> None:
        if self._counted:
            self._counted = False
            _count(-1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._answered()  # a request cut off before its answer
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            self._dropped += len(data)
            if self._dropped > self._linger:
                self.transport.close()
            return
        if self._in_head:
            self._head_bytes += len(data)
        elif self.cycle is not None and self.cycle.more_body:
            self._arm(self._body_timeout, self._body_stalled)  # the body is moving
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes > self._max_head and not self._draining:
            self._refuse(431, f"request head over {self._max_head} bytes")

    def on_message_begin(self) -> None:
        if self._draining:
            return
        super().on_message_begin()
        # (the head's bytes are counted from the end of the previous response: data_received
        # has already counted this chunk)
        self._in_head, self._header_count, self._dropped = True, 0, 0

    # Once refused, the parser may still call back for the rest of the chunk: ignored.

    def on_url(self, url: bytes) -> None:
        if not self._draining:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._draining:
            return
        self._header_count += 1
        if self._header_count > self._max_headers:
            self._refuse(431, f"more than {self._max_headers} header lines")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._draining:
            return
        declared = dict(self.headers).get(b"content-length", b"0")
        self._declared = int(declared) if declared.isdigit() else 0
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before and self.cycle is not None:  # a handler's task is made
            self._answered()  # (one request at a time on a connection)
            self._counted = True
            _count(1)
        # A client that asked to close (urllib, requests: `Connection: close`) would have its
        # connection closed the moment the answer is sent, unread body and all, and the
        # kernel's reset could destroy the answer: we close it ourselves, once it is read.
        cycle = self.cycle
        self._client_close = cycle is not None and not cycle.keep_alive
        if cycle is not None:
            cycle.keep_alive = True
        self._arm(self._body_timeout, self._body_stalled)

    def on_body(self, body: bytes) -> None:
        if self._draining:
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:  # refused already: drop it
            self._dropped += len(body)
            if self._dropped > self._linger:
                self.transport.close()
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._draining:
            return
        self._disarm()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self._client_close:
            self.transport.close()  # the refused body has been read to its end
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._answered()
        super().on_response_complete()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.more_body:  # answered before the body ended (413)
            if self._declared - len(cycle.body) > self._linger:
                self.transport.close()  # too much to read and drop: refuse at once
                return
            self._arm(self._body_timeout, self._body_stalled)
        elif self._client_close:
            self.transport.close()
        else:
            self._in_head = True  # waiting for the next request's head
            self._head_bytes = 0
            self._arm(self._head_timeout, self._head_expired)
