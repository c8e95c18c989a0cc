"""The data port's HTTP/1.1 server: ``asyncio.Protocol`` + httptools (llhttp), in uvicorn's manner.

Why not a framework: the proxy must see the request target exactly as the client sent it (still
percent-encoded, never normalised), answer ``Expect: 100-continue`` at once, forward compressed and
chunked bodies byte for byte, cancel a handler whose client went away, and time out slow clients;
and a cache hit must cost a few tens of microseconds. Owning the protocol gives all of that.

Rules this module enforces for every connection:

- llhttp parses strictly: control characters in the request line or headers, CL+TE, duplicate
  Content-Length, bare LF, obsolete folding are refused with 400 before anything goes upstream.
  A fragment (``#``) in the target is refused too, as HAProxy does.
- Requests on a connection are answered in order (pipelining); at most ``max_pipelined`` wait.
- Time limits: the header section must arrive within ``header_timeout``; a body may not stall for
  more than ``body_timeout``, and must average ``body_min_rate`` bytes/s once ``body_min_rate_grace``
  has passed (a body trickled a byte at a time never stalls); the whole request must arrive within
  ``request_timeout`` when one is set; an idle keep-alive connection is closed after
  ``keepalive_timeout``; a client that does not read its answer for ``body_timeout`` is dropped.
  Time the server was not reading (its own backpressure, or an ``Expect: 100-continue`` client
  waiting for the go-ahead) is not the client's. One sweep timer per server checks every
  connection, so the hot path only stores a number.
- At most ``max_connections`` at once: past it the oldest idle keep-alive connection is closed to
  make room, else the newcomer gets a 503 and is closed.
- Error answers never quote request bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from ..config import LimitsConfig
from ..errors import ClientClosed, PayloadTooLarge, RequestTimeout
from ..logs import where

log = logging.getLogger("sidecar.http")

Header = tuple[bytes, bytes]
_HIGH_WATER = 512 * 1024  # body bytes buffered before reading from the client pauses
_LOW_WATER = 128 * 1024
_SWEEP_INTERVAL = 0.5
_STATUS_REASONS = {
    200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Payload Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}


def reason_for(status: int) -> bytes:
    return _STATUS_REASONS.get(status, b"Unknown")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 60.0
    max_connections: int = 4096
    max_pipelined: int = 16
    body_min_rate: int = 1024  # bytes/s; 0: no minimum
    body_min_rate_grace: float = 10.0
    request_timeout: float = 0.0  # 0: none
    lingering_time: float = 30.0  # 0: close at once after an answer that left the body unread
    lingering_timeout: float = 5.0
    lingering_bytes: int = 256 * 1024 * 1024

    @classmethod
    def from_config(cls, limits: LimitsConfig, max_connections: int) -> ServerLimits:
        return cls(max_header_bytes=limits.max_header_bytes, header_timeout=limits.header_timeout,
                   body_timeout=limits.body_timeout, keepalive_timeout=limits.keepalive_timeout,
                   max_connections=max_connections, body_min_rate=limits.body_min_rate,
                   body_min_rate_grace=limits.body_min_rate_grace, request_timeout=limits.request_timeout,
                   lingering_time=limits.lingering_time, lingering_timeout=limits.lingering_timeout,
                   lingering_bytes=limits.lingering_bytes)


class Body:
    """A request body as it arrives; the handler reads it whole or streams it, never both."""

    __slots__ = ("_chunks", "_conn", "_error", "_expect_continue", "_waiter", "buffered", "complete", "received")

    def __init__(self, conn: H1Connection, expect_continue: bool) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._expect_continue = expect_continue
        self.buffered = 0
        self.received = 0
        self.complete = False

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self.buffered += len(chunk)
        self.received += len(chunk)
        if self.buffered > _HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def end(self) -> None:
        self.complete = True
        self._wake()

    def reopen(self) -> None:
        """llhttp ended an upgrade request's body at its headers; its bytes follow after all."""
        self.complete = False

    def fail(self, error: BaseException) -> None:
        if not self.complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _continue(self) -> None:
        """The client waits for a 100 before sending the body: tell it to go on, once, when it is wanted."""
        if self._expect_continue:
            self._expect_continue = False
            if not self.complete:
                self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._conn.start_body_clock()

    async def _next(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            self._conn.body_wanted()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered < _LOW_WATER:
            self._conn.resume_reading()
        return chunk

    async def read(self, limit: int, account: Callable[[int], None] | None = None) -> bytes:
        """The whole body; PayloadTooLarge past ``limit`` bytes. ``account`` is told of each chunk's size
        before it is kept (the memory budget of bodies in flight raises there)."""
        self._continue()
        parts: list[bytes] = []
        while (chunk := await self._next()) is not None:
            if self.received > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            if account is not None:
                account(len(chunk))
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def stream(self, limit: int) -> AsyncIterator[bytes]:
        self._continue()
        while (chunk := await self._next()) is not None:
            if self.received > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            yield chunk


class Request:
    """One request head as received. ``target`` is the raw request target, never decoded."""

    __slots__ = (
        "_index",
        "arrived",
        "body",
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "target",
        "version",
    )

    def __init__(self, method: str, target: bytes, headers: list[Header], version: str, keep_alive: bool,
                 body: Body) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition(b"?")
        self.path = path.decode("latin-1")
        self.query = query
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.body = body
        self._index: dict[bytes, bytes] | None = None
        self.arrived = 0.0  # the loop's clock when the header section was complete
        self.content_length: int | None = None
        self.chunked = False

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of a header, in order; ``name`` in lower case."""
        return [v for k, v in self.headers if k.lower() == name]

    def header(self, name: bytes) -> bytes | None:
        """Last value of a header; ``name`` in lower case."""
        index = self._index
        if index is None:
            index = self._index = {k.lower(): v for k, v in self.headers}
        return index.get(name)

    def __repr__(self) -> str:
        return f"<Request {self.method} {len(self.target)}-byte target HTTP/{self.version}>"


class Responder:
    """Writes the one answer to one request: whole (``send``) or streamed (``start``/``write``/``end``)."""

    __slots__ = ("_conn", "_head_only", "_mode", "close_after", "finished", "request", "started", "status")

    def __init__(self, conn: H1Connection, request: Request) -> None:
        self._conn = conn
        self.request = request  # what is answered: some answer headers depend on request headers
        self._head_only = request.method == "HEAD"
        self._mode = ""
        self.started = False
        self.finished = False
        self.close_after = not request.keep_alive
        self.status = 0

    def send(self, status: int, headers: list[Header], body: bytes, reason: bytes = b"") -> None:
        """A whole answer; Content-Length is added here (kept as given for HEAD when the caller set one)."""
        self._begin(status)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_for(status))]
        has_length = False
        for k, v in headers:
            if self._head_only and k.lower() == b"content-length":
                has_length = True
            lines.append(b"%s: %s\r\n" % (k, v))
        if not has_length and status >= 200 and status not in (204, 304):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(self._conn_header())
        lines.append(b"\r\n")
        if not self._head_only:
            lines.append(body)
        self._conn.write(b"".join(lines))
        self._finish()

    def start(self, status: int, headers: list[Header], *, length: int | None, chunked: bool,
              reason: bytes = b"") -> None:
        """Headers of a streamed answer: framed by ``length``, chunked, or (neither) by closing."""
        self._begin(status)
        if chunked and self._conn.http10:
            chunked = False  # an HTTP/1.0 client cannot read chunks: delimit by closing instead
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_for(status))]
        lines.extend(b"%s: %s\r\n" % (k, v) for k, v in headers)
        no_body = self._head_only or status in (204, 304)
        if length is not None:
            lines.append(b"Content-Length: %d\r\n" % length)
            self._mode = "length"
        elif chunked and not no_body:
            lines.append(b"Transfer-Encoding: chunked\r\n")
            self._mode = "chunked"
        else:
            self._mode = "close"
        if no_body:
            self._mode = "none"
        if self._mode == "close":
            self.close_after = True
        lines.append(self._conn_header())
        lines.append(b"\r\n")
        self._conn.write(b"".join(lines))

    def _conn_header(self) -> bytes:
        if self._conn.server.draining:
            self.close_after = True  # shutting down: the client should reconnect elsewhere
        if self.close_after:
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if self._conn.http10 else b""

    async def write(self, chunk: bytes) -> None:
        if not chunk or self._mode == "none":
            return
        if self._mode == "chunked":
            self._conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self._conn.write(chunk)
        await self._conn.drain()

    def end(self, trailers: list[Header] | None = None) -> None:
        if self._mode == "chunked":
            tail = b"".join(b"%s: %s\r\n" % kv for kv in trailers or ())
            self._conn.write(b"0\r\n" + tail + b"\r\n")
        self._finish()

    def abort(self) -> None:
        """The answer cannot be completed (its source broke): cutting the connection is the only honest signal."""
        self.close_after = True
        self._conn.close()

    def _begin(self, status: int) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status

    def _finish(self) -> None:
        self.finished = True


Handler = Callable[[Request, Responder], Awaitable[None]]


class H1Connection(asyncio.Protocol):
    def __init__(self, server: H1Server) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[tuple[Request, Responder]] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.closed = False
        self.http10 = False
        self.deadline = 0.0  # loop time after which the sweep times this connection out; 0: none
        self.idle_since = 0.0
        # Loop time the request being received began, and its body, each moved later by the time reading was
        # paused; 0: none (the body's: not yet the client's turn to send, as under Expect: 100-continue).
        self.request_began = 0.0
        self.body_began = 0.0
        self._paused_at = 0.0
        self._reading_paused = False
        self._writing_paused: asyncio.Future[None] | None = None
        self._url = bytearray()
        self._headers: list[Header] = []
        self._header_bytes = 0
        self._body: Body | None = None
        self._in_message = False
        self._timed_out = False
        self._reason = ""  # why a callback refused the request (llhttp only says "callback error")
        self._raw: _BodyParser | None = None  # an upgrade request's body (llhttp stops at its headers)
        # Answered with the body unread: what still arrives is read and dropped until then (loop time; 0: not).
        self._linger_until = 0.0
        self._lingered = 0

    def __repr__(self) -> str:
        return f"<H1Connection queued={len(self.queue)} closed={self.closed}>"

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports behave as one
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.server.admit(self):
            self._refuse(503, "too many connections to the sidecar; retry later")
            return
        self._set_idle(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.forget(self)
        if self._body is not None:
            self._body.fail(ClientClosed("client closed the connection while sending the body"))
        for request, responder in self.queue:
            request.body.fail(ClientClosed("client closed the connection"))
            if not responder.finished:
                self.server.event("disconnect")
        if self.worker is not None and not self.worker.done():
            self.worker.cancel()  # the client is gone: its held or queued work is cancelled with it
        waiter = self._writing_paused
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientClosed("client closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._linger_until:
            self._discard(len(data))
            return
        if self._raw is not None:
            self._raw_body(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._after_upgrade(data[e.args[0]:] if e.args and isinstance(e.args[0], int) else b"")
        except httptools.HttpParserError as e:
            self._protocol_error(self._reason or str(e))

    def eof_received(self) -> bool:
        """The client closed its side. Like HAProxy's ``option abortonclose``, that ends its calls: a client
        that is gone must not keep held or queued work alive (a client that only half-closes after sending,
        rare in practice, loses its answer; the difference is documented)."""
        return False

    def pause_writing(self) -> None:
        if self._writing_paused is None:
            self._writing_paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._writing_paused = self._writing_paused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._header_bytes = 0
        self._in_message = True
        now = self.server.now()
        self.request_began = now
        self.deadline = now + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        self.http10 = version == "1.0"
        target = bytes(self._url)
        method = parser.get_method().decode("ascii")
        if b"#" in target:
            self._reason = "fragment in request target"
            raise httptools.HttpParserError(self._reason)
        if target[:1] == b"*" and (target != b"*" or method != "OPTIONS"):
            self._reason = "asterisk-form request target is only for OPTIONS"
            raise httptools.HttpParserError(self._reason)
        if target[:1] != b"/" and target != b"*":
            target = _origin_form(target)
        expect_continue = self._expect_continue()
        body = Body(self, expect_continue)
        request = Request(method, target, self._headers, version, parser.should_keep_alive(), body)
        request.arrived = self.server.now()
        self.body_began = 0.0 if expect_continue else request.arrived
        self._frame(request)
        self._body = body
        self._in_message = False
        self.deadline = 0.0
        self.queue.append((request, Responder(self, request)))
        if len(self.queue) > self.limits.max_pipelined:
            self.pause_reading()
        if self.worker is None:
            self.worker = self.server.loop.create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)
            if self._body.received and not self._reading_paused:
                self.deadline = self.server.now() + self.limits.body_timeout

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.end()
            self._body = None
        self.deadline = 0.0
        self.request_began = self.body_began = 0.0

    # -- serving -----------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self.queue:
                request, responder = self.queue[0]
                await self._answer(request, responder)
                self.queue.popleft()
                if not request.body.complete and not self.closed:
                    self.linger()
                    return
                if responder.close_after or self.closed:
                    self.close()
                    return
                if self._reading_paused and len(self.queue) <= self.limits.max_pipelined:
                    self.resume_reading()
        finally:
            self.worker = None
        self._set_idle(self.limits.keepalive_timeout)

    async def _answer(self, request: Request, responder: Responder) -> None:
        try:
            await self.server.handler(request, responder)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The handler maps every error it knows; this is a bug, logged without request content.
            log.error("internal error (%s) answering a %s request\n%s", type(e).__name__, request.method, where(e))
            if not responder.started:
                responder.send(500, [(b"Content-Type", b"application/json")], b'{"error":"internal sidecar error"}')
        if not responder.finished:
            responder.abort()

    # -- flow control and output -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        waiter = self._writing_paused
        if waiter is None:
            if self.closed:
                raise ClientClosed("client closed the connection")
            return
        self.deadline = self.server.now() + self.limits.body_timeout  # a client that stops reading is dropped
        try:
            await waiter
        finally:
            self.deadline = 0.0

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.deadline = 0.0  # waiting on us is not the client's fault
            self._paused_at = self.server.now()
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            if len(self.queue) > self.limits.max_pipelined:
                return
            self._reading_paused = False
            self._excuse(self.server.now() - self._paused_at)
            self.transport.resume_reading()

    def start_body_clock(self) -> None:
        """The client was told to send its body (100 Continue): from now on, its pace is its own."""
        if self._body is not None and not self.body_began:
            self.body_began = self.server.now()

    def _excuse(self, seconds: float) -> None:
        """Reading was paused for ``seconds``: the request's clocks stop meanwhile."""
        if self.request_began:
            self.request_began += seconds
        if self.body_began:
            self.body_began += seconds

    def body_wanted(self) -> None:
        """A handler waits for body bytes: the client is on the clock again."""
        self.resume_reading()
        if not self._reading_paused:
            self.deadline = self.server.now() + self.limits.body_timeout

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def linger(self) -> None:
        """The answer is written but the client may still be sending the request it answers. Closing now would
        let the kernel answer those bytes with a reset that destroys the answer before the client reads it
        (RFC 9112, 9.6): half-close instead, read and drop what still arrives, bounded in time and bytes, then
        close (nginx's lingering close)."""
        transport = self.transport
        if transport is None or self.closed or self.limits.lingering_time <= 0 or not transport.can_write_eof():
            self.close()
            return
        now = self.server.now()
        self._linger_until = now + self.limits.lingering_time
        self.deadline = min(now + self.limits.lingering_timeout, self._linger_until)
        self._body, self._in_message, self._raw = None, False, None
        self.request_began = self.body_began = 0.0
        transport.write_eof()  # FIN once the answer is flushed
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _discard(self, n: int) -> None:
        self._lingered += n
        if self._lingered > self.limits.lingering_bytes:
            self.close()
            return
        self.deadline = min(self.server.now() + self.limits.lingering_timeout, self._linger_until)

    # -- time limits and errors --------------------------------------------------------------------

    def _set_idle(self, timeout: float) -> None:
        if self._in_message:
            return  # the next request has begun: its header deadline stands
        now = self.server.now()
        self.idle_since = now
        self.deadline = now + timeout

    @property
    def idle(self) -> bool:
        return self.worker is None and not self.queue and self._body is None and not self._in_message

    def too_slow(self, now: float) -> bool:
        """The request as a whole arrives too slowly: past ``request_timeout``, or its body under ``body_min_rate``
        once the grace has passed (the minimum rate of Apache's mod_reqtimeout). Checked by the sweep, only
        for connections receiving a request; never while the server is not reading."""
        if self._timed_out or self._reading_paused:
            return False
        limits = self.limits
        if limits.request_timeout and now > self.request_began + limits.request_timeout:
            return True
        body = self._body
        return (body is not None and limits.body_min_rate > 0 and self.body_began > 0
                and now > self.body_began + limits.body_min_rate_grace + body.received / limits.body_min_rate)

    def timed_out(self) -> None:
        if self.idle or self._timed_out or self._writing_paused is not None or self._linger_until:
            self.close()  # idle keep-alive, a second strike, or a client that does not read its answer
            return
        self._timed_out = True
        self.server.event("timeout")
        error = RequestTimeout("client too slow: request not received in time")
        if self._in_message and not self.queue:
            self._refuse(error.http_status, error.message)  # the header section never completed
            return
        if self._body is not None:
            self._body.fail(error)  # the handler answers 408; the connection closes after it
        self.deadline = self.server.now() + 1.0

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            raise httptools.HttpParserError("header section too large")

    def _protocol_error(self, why: str) -> None:
        log.debug("malformed request refused: %s", why)  # llhttp's reason, never the bytes themselves
        self.server.event("malformed")
        if self.queue:
            self.close()  # an answer is being written already; nothing else can be said in order
        elif "too large" in why:
            self._refuse(431, "request header section too large", linger=True)
        elif "Invalid method" in why:
            self._refuse(405, "Method Not Allowed", linger=True)  # Triton's own answer to a method it does not know
        else:
            self._refuse(400, f"malformed HTTP request ({why})", linger=True)

    def _refuse(self, status: int, message: str, linger: bool = False) -> None:
        body = b'{"error":"%s"}' % message.replace('"', "'").encode()
        reason = b"Request Header Fields Too Large" if status == 431 else reason_for(status)
        kind = b"text/plain" if status == 405 else b"application/json"  # Triton's own 405 says text/plain
        self.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                   b"Connection: close\r\n\r\n%s" % (status, reason, kind, len(body), body))
        if linger:
            self.linger()  # the rest of what the client sends is read and dropped: it gets this answer
        else:
            self.close()

    def _after_upgrade(self, rest: bytes) -> None:
        """An Upgrade request (curl --http2 sends one): the model servers ignore the upgrade, so it is an
        ordinary request whose body follows its headers, framed as it says; the connection closes after it."""
        if not self.queue:
            self._refuse(400, "upgrade requests are not supported")
            return
        request, responder = self.queue[-1]
        responder.close_after = True
        if not request.content_length and not request.chunked:
            return
        request.body.reopen()
        framing = b"Transfer-Encoding: chunked" if request.chunked else b"Content-Length: %d" % (
            request.content_length or 0)
        self._raw = _BodyParser(request.body, framing)
        self._raw_body(rest)

    def _raw_body(self, data: bytes) -> None:
        """Body bytes of an upgrade request, read by a parser of their own; anything after them is ignored."""
        assert self._raw is not None
        if data and not self._raw.done:
            try:
                self._raw.feed(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                # llhttp reads on past the body's end; what follows it is ignored, whatever it is.
                if not self._raw.done:
                    self._raw.body.fail(ClientClosed("malformed body on an upgrade request"))
                    self.close()

    def _expect_continue(self) -> bool:
        for k, v in self._headers:
            if len(k) == 6 and k.lower() == b"expect":
                return v.strip().lower() == b"100-continue"
        return False

    def _frame(self, request: Request) -> None:
        length = request.header(b"content-length")
        if length is not None:
            request.content_length = int(length)  # llhttp has validated it
        request.chunked = request.header(b"transfer-encoding") is not None
        if request.content_length is None and not request.chunked:
            request.body.complete = True  # no body; on_message_complete follows


class _BodyParser:
    """llhttp reading just a body, framed as a synthetic head says (the head of an upgrade request)."""

    def __init__(self, body: Body, framing: bytes) -> None:
        self.body = body
        self.done = False
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, chunk: bytes) -> None:
        self.body.feed(chunk)

    def on_message_complete(self) -> None:
        self.done = True
        self.body.end()


def _origin_form(target: bytes) -> bytes:
    """``http://host/p?q`` -> ``/p?q``: decisions and forwarding use one and the same path."""
    parsed = httptools.parse_url(target)
    path = parsed.path or b"/"
    return path + (b"?" + parsed.query if parsed.query else b"")


class H1Server:
    """Owns the connections of one listening socket: limits, the timeout sweep, counters."""

    def __init__(self, handler: Handler, limits: ServerLimits, on_event: Callable[[str], None] | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.connections: set[H1Connection] = set()
        # "disconnect" | "timeout" | "malformed" | "too_many_connections", for metrics.
        self.event: Callable[[str], None] = on_event or (lambda _kind: None)
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<H1Server connections={len(self.connections)}/{self.limits.max_connections}>"

    def now(self) -> float:
        return self.loop.time()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "H1Server used before listen()"
        return self._loop

    async def listen(self, host: str, port: int, backlog: int = 1024, reuse_port: bool = False) -> None:
        """Listen; with ``reuse_port`` beside other processes on the same port (SO_REUSEPORT: the kernel
        spreads new connections over them)."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: H1Connection(self), host, port, backlog=backlog,
                                                      reuse_address=True, reuse_port=reuse_port or None)
        self._sweeper = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def admit(self, conn: H1Connection) -> bool:
        if len(self.connections) >= self.limits.max_connections:
            idle = [c for c in self.connections if c.idle]
            if not idle:
                self.event("too_many_connections")
                return False
            min(idle, key=lambda c: c.idle_since).close()  # the longest-idle keep-alive makes room
        self.connections.add(conn)
        return True

    def forget(self, conn: H1Connection) -> None:
        self.connections.discard(conn)

    def _sweep(self) -> None:
        now = self.now()
        for conn in [c for c in self.connections if 0 < c.deadline <= now or (c.request_began and c.too_slow(now))]:
            conn.timed_out()
        assert self._loop is not None
        self._sweeper = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def stop_listening(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()

    def close_idle(self) -> None:
        for conn in [c for c in self.connections if c.idle]:
            conn.close()

    async def drain(self, grace: float) -> bool:
        """Wait until no request is being answered (closing idle connections as they become idle)."""
        deadline = time.monotonic() + grace
        while True:
            self.close_idle()
            busy = [c.worker for c in self.connections if c.worker is not None]
            if not busy:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(busy, timeout=remaining)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
