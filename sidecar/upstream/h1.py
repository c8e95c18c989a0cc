"""The sidecar's one HTTP/1.1 client to the model server: a keep-alive pool for one origin.

Used for everything that goes upstream: the inference hot path (``H1Pool.request``: one
whole buffered exchange), raw pass-through streaming in both directions (``H1Pool.stream``)
and health probes. Requests are written with one ``transport.write``; answers are parsed by
httptools (llhttp, the parser uvicorn uses) in strict mode.

Safety rules. The pool sits in front of every inference pod; a pooled connection that hands a
caller bytes that are not the answer to its own request leaks one user's results to another
(redis-py CVE-2023-28858 is the cautionary tale). So:

1. A connection goes back to the pool only when the whole answer to its request has arrived,
   the whole request was written, and both sides keep the connection alive. Everything else
   closes it.
2. Any byte the client was not waiting for closes the connection and the connection is never
   reused: bytes on an idle connection, bytes after a complete answer, a second answer to one
   request, body bytes to a HEAD request. (llhttp skips bare CR/LF between messages itself;
   those carry no content and cannot form an answer.)
3. A malformed answer (status line, header bytes, framing) is a ``ProtocolError``: the caller
   gets the error and the connection is closed. Framing is strict: Content-Length together with
   Transfer-Encoding, duplicate Content-Length, a transfer-coding other than ``chunked``, a
   header section over ``max_header_bytes``, 101 Switching Protocols, a version other than
   1.0/1.1 are all refused.
4. A caller that is cancelled or times out at any point (waiting for a slot, connecting,
   writing, waiting for the answer, reading a streamed body) closes its connection: a late
   answer can never reach the next caller.
5. Each answer gets its own header, trailer and body lists; nothing is shared between answers.
6. ``request()`` retries once, on a fresh connection, only when a reused connection failed
   before any byte of answer arrived (the server closed it while idle: the keep-alive race).

Nothing here logs payload bytes (bodies, header values).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
import ssl as ssl_module
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit

import httptools

__all__ = ["BodyTooLarge", "ConnectionFailed", "H1Pool", "H1Response", "H1Stream", "ProtocolError", "RequestBodyError"]

log = logging.getLogger(__name__)

HeaderList = list[tuple[bytes, bytes]]
HeaderInput = Sequence[tuple[bytes | str, bytes | str]]

# Below this size a body is copied next to the head, so the request leaves in one segment.
_JOIN_LIMIT: Final = 256 * 1024
# A streamed answer stops reading the socket above HIGH buffered bytes, resumes below LOW.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024
# A server that sends interim (1xx) answers forever is out of step.
_MAX_INTERIM: Final = 16
# Bodies of answers to these methods are empty unless the caller gives one: send no Content-Length.
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
# The pool frames requests itself; a caller's values for these would contradict it.
_POOL_HEADERS: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB; obs-text is allowed
_BAD_TARGET: Final = re.compile(rb"[\x00-\x20\x7f]")
_COMMON_REASONS: Final = frozenset({b"", b"OK", b"Created", b"Accepted", b"No Content", b"Bad Request", b"Not Found",
                                    b"Internal Server Error", b"Service Unavailable", b"Continue"})

# Connection states.
_IDLE: Final = 0  # no exchange: any byte is unsolicited
_HEAD: Final = 1  # request written; waiting for the final status line and headers
_BODY: Final = 2  # final headers in; body (and trailers) arriving
_DONE: Final = 3  # the whole answer is in; any further byte is out of step
_CLOSED: Final = 4


class ConnectionFailed(Exception):
    """Could not connect, or the connection broke before a complete response.

    ``reused``: the connection had served before (the server may have closed it while idle);
    ``got_bytes``: some of the response had arrived (the request surely reached the server);
    ``sent``: some of the request was written. Repeating the request is safe only when
    ``not got_bytes`` (and, for a request that is not idempotent, only in the idle race).
    """

    def __init__(self, message: str, reused: bool = False, got_bytes: bool = False, sent: bool = False) -> None:
        super().__init__(message)
        self.reused = reused
        self.got_bytes = got_bytes
        self.sent = sent


class ProtocolError(ConnectionFailed):
    """The answer was malformed or out of step; the connection was closed."""


class BodyTooLarge(Exception):
    """The response body is larger than the caller's ``max_body``; the connection was closed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response body larger than {limit} bytes")
        self.limit = limit


class RequestBodyError(ValueError):
    """A streamed request body did not match its ``content_length``; the connection was closed."""


@dataclass(slots=True)
class H1Response:
    """A whole buffered answer. ``headers`` are raw, in order, names as received."""

    status: int
    reason: bytes
    headers: HeaderList
    body: bytes
    trailers: HeaderList
    http_version: str


class H1Stream:
    """A streamed answer: iterate it for the body chunks as they arrive.

    Framing, for forwarding: ``content_length`` is set when the body has that exact length;
    ``chunked`` when the upstream sent it chunked (``trailers`` then fill in once the body is
    consumed); ``close_delimited`` when the body ends where the upstream closed the connection
    (neither length nor chunked; never reused); ``has_body`` is false for answers that carry
    none (HEAD, 1xx, 204, 304), whatever their Content-Length header says.

    Read it inside the ``H1Pool.stream`` context; afterwards it raises ConnectionFailed unless
    it had been read to its end. A failure mid-body (upstream gone, malformed chunk, the
    caller's request body iterable failing) is raised from the iteration.
    """

    __slots__ = (
        "_buffered", "_chunks", "_conn", "_done", "_error", "_paused", "_waiter", "chunked",
        "close_delimited", "content_length", "has_body", "headers", "http_version", "reason", "status", "trailers",
    )

    def __init__(self, conn: _Conn, content_length: int | None, chunked: bool, close_delimited: bool,
                 has_body: bool) -> None:
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.http_version = conn.version
        self.trailers = conn.trailers
        self.content_length = content_length
        self.chunked = chunked
        self.close_delimited = close_delimited
        self.has_body = has_body
        self._conn: _Conn | None = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<H1Stream {self.status} buffered={self._buffered} done={self._done}>"

    def __aiter__(self) -> H1Stream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._chunks:
                return self._take()
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self) -> bytes:
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered <= _LOW_WATER:
            self._paused = False
            if self._conn is not None:
                self._conn.resume_reading()
        return data

    # Called by the connection.
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if not self._paused and self._buffered > _HIGH_WATER and self._conn is not None:
            self._paused = True  # bounded buffering: the upstream waits for the consumer
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._done and self._error is None:
            self._error = exc
            self._wake()

    @property
    def _drained(self) -> bool:
        """The whole answer arrived and every byte of it was handed to the consumer."""
        return self._done and not self._chunks and self._error is None

    def _detach(self) -> None:
        """The context has ended: the connection is no longer this stream's to steer, nor to read."""
        self._conn = None
        if not self._drained:
            self._chunks.clear()
            self._buffered = 0
            self._error = ConnectionFailed("stream read after its context ended")
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Abort(Exception):
    """Raised inside a parser callback to stop llhttp; the reason is in ``_Conn.error``."""


class _Conn(asyncio.Protocol):
    """One upstream connection; at most one exchange at a time, driven by the pool."""

    def __init__(self, pool: H1Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.max_header_bytes = pool.max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.parser_dirty = False  # after HEAD, llhttp may still expect a body: start afresh
        self.state = _IDLE
        self.served = 0
        self.generation = 0  # which exchange this is: a request body sender acts only on its own
        self.idle_since = 0.0
        # The exchange in progress.
        # Resolves to an H1Response (request) or, at the final headers, an H1Stream (stream).
        self.waiter: asyncio.Future[Any] | None = None
        self.stream: H1Stream | None = None
        self.streaming = False
        self.is_head = False
        self.max_body: int | None = None
        self.got_bytes = False
        self.body_sent = True
        self.interim = 0
        self.error: BaseException | None = None
        self.fed = 0  # bytes fed since the parser last got past a header section or body piece
        # The message being parsed.
        self.status = 0
        self.reason = b""
        self.version = "1.1"
        self.headers: HeaderList = []
        self.trailers: HeaderList = []
        self.parts: list[bytes] = []
        self.body_len = 0
        self.trailer_bytes = 0
        self.content_length: bytes | None = None
        self.transfer_encoding: bytes | None = None
        self.keep_alive = False
        self.close_delimited = False
        self.head_tail_ok = False
        # Request body flow control.
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<_Conn state={self.state} served={self.served}>"

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state != _HEAD and state != _BODY:
            self._out_of_step("bytes arrived while no answer was expected")
            return
        self.got_bytes = True
        self.fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(self.error or ProtocolError("protocol upgrade is not supported", *self._flags()))
            return
        except httptools.HttpParserError as e:
            if self.state == _DONE:  # the answer was complete: what follows it is out of step
                self._out_of_step("bytes arrived after a complete answer")
            elif self.state != _CLOSED:
                self._fail(self.error or ProtocolError(f"malformed answer from upstream ({e})", *self._flags()))
            return
        # llhttp holds a header section (or trailer section) until it ends: bound what it may hold.
        if self.fed > self.max_header_bytes and (self.state == _HEAD or self.state == _BODY):
            self._fail(ProtocolError("upstream header section too large", *self._flags()))

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost ends a close-delimited body

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        if state == _BODY and self.close_delimited and exc is None:
            self._complete()
        elif state in (_HEAD, _BODY):
            self._fail(ConnectionFailed("upstream closed the connection before a complete answer", *self._flags()))
        elif state == _IDLE:
            self.pool._forget(self)
        self.state = _CLOSED
        self.write_paused = False
        self._wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.state != _HEAD:
            raise self._abort(ProtocolError("a second answer to one request", *self._flags()))
        self.reason = b""
        self.headers = []
        self.trailers = []
        self.trailer_bytes = 0
        self.content_length = None
        self.transfer_encoding = None

    def on_status(self, reason: bytes) -> None:
        # llhttp hands spans over per read: a reason split across reads comes in pieces.
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Sizes are bounded by ``fed`` in data_received and counted exactly in on_headers_complete.
        if self.state != _HEAD:
            self._trailer(name, value)
            return
        self.headers.append((name, value))
        size = len(name)
        if size == 14 or size == 17:
            self._framing_header(name, value)

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        self.status = status
        if self.fed > self.max_header_bytes:  # this read may hold body bytes too: count exactly
            self._check_size()
        self.fed = 0
        if status < 200:
            self._interim(status)
            return
        if status > 599:
            raise self._abort(ProtocolError(f"invalid status {status}", *self._flags()))
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise self._abort(ProtocolError("unsupported HTTP version", *self._flags()))
        self.version = version
        reason = self.reason
        if reason not in _COMMON_REASONS and _BAD_VALUE.search(reason):  # llhttp lets CTLs through here
            raise self._abort(ProtocolError("invalid byte in the reason phrase", *self._flags()))
        if self.transfer_encoding is not None:
            self._check_transfer_encoding()
        self.keep_alive = parser.should_keep_alive()
        self._start_body(status)

    def on_body(self, body: bytes) -> None:
        if self.state != _BODY:
            raise self._abort(ProtocolError("body bytes where none were expected", *self._flags()))
        self.fed = 0
        stream = self.stream
        if stream is not None:
            stream._feed(body)
            return
        self.body_len += len(body)
        if self.max_body is not None and self.body_len > self.max_body:
            raise self._abort(BodyTooLarge(self.max_body))
        self.parts.append(body)

    def on_chunk_header(self) -> None:
        if self.state != _BODY:
            raise self._abort(ProtocolError("a chunk where none was expected", *self._flags()))
        self.fed = 0

    def on_chunk_complete(self) -> None:
        if self.state != _BODY:
            raise self._abort(ProtocolError("a chunk where none was expected", *self._flags()))
        self.fed = 0

    def on_message_complete(self) -> None:
        state = self.state
        if state == _BODY and self.stream is None:  # the hot path: a whole buffered answer
            self.state = _DONE
            self.served += 1
            self._resolve()
            return
        if state == _HEAD:  # an interim answer ended; the final one follows
            return
        if state == _DONE and self.head_tail_ok:  # llhttp ends a bodiless answer to HEAD by itself
            self.head_tail_ok = False
            return
        if state != _BODY:
            raise self._abort(ProtocolError("an answer ended where none was expected", *self._flags()))
        self._complete()

    # parsing helpers (the rare paths)

    def _framing_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length":
            if self.content_length is not None:  # llhttp refuses these too; this does not rely on it
                raise self._abort(ProtocolError("duplicate Content-Length", *self._flags()))
            self.content_length = value
        elif lower == b"transfer-encoding":
            if self.transfer_encoding is not None:
                raise self._abort(ProtocolError("duplicate Transfer-Encoding", *self._flags()))
            self.transfer_encoding = value

    def _trailer(self, name: bytes, value: bytes) -> None:
        if self.state != _BODY:
            raise self._abort(ProtocolError("fields where none were expected", *self._flags()))
        self.trailers.append((name, value))  # kept apart: never mixed into the headers
        self.trailer_bytes += len(name) + len(value) + 4
        if self.trailer_bytes > self.max_header_bytes:
            raise self._abort(ProtocolError("upstream trailer section too large", *self._flags()))

    def _check_size(self) -> None:
        # As on the wire: "HTTP/1.1 200 " reason CRLF, "name: value" CRLF each, CRLF.
        size = 15 + len(self.reason) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 2
        if size > self.max_header_bytes:
            raise self._abort(ProtocolError("upstream header section too large", *self._flags()))

    def _check_transfer_encoding(self) -> None:
        if self.content_length is not None:
            raise self._abort(ProtocolError("both Content-Length and Transfer-Encoding", *self._flags()))
        if self.transfer_encoding is None or self.transfer_encoding.strip().lower() != b"chunked":
            # Other codings cannot be forwarded faithfully once de-chunked: refuse them.
            raise self._abort(ProtocolError("unsupported transfer-coding", *self._flags()))

    def _interim(self, status: int) -> None:
        if status == 101:
            raise self._abort(ProtocolError("101 Switching Protocols is not supported", *self._flags()))
        if status < 100:
            raise self._abort(ProtocolError(f"invalid status {status}", *self._flags()))
        self.interim += 1
        if self.interim > _MAX_INTERIM:
            raise self._abort(ProtocolError("too many interim answers", *self._flags()))

    def _start_body(self, status: int) -> None:
        """Work out the body's framing from the final headers and get ready for it."""
        no_body = self.is_head or status == 204 or status == 304
        chunked = not no_body and self.transfer_encoding is not None
        declared = None if self.content_length is None else int(self.content_length)  # llhttp checked the digits
        length = None if no_body else declared
        self.close_delimited = not no_body and not chunked and length is None
        if self.close_delimited:
            self.keep_alive = False
        if self.max_body is not None and length is not None and length > self.max_body:
            raise self._abort(BodyTooLarge(self.max_body))
        self.state = _BODY
        if self.streaming:
            self.stream = H1Stream(self, length, chunked, self.close_delimited, not no_body)
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(self.stream)
        if self.is_head:
            # llhttp cannot be told the request was HEAD: it may wait for a body that never
            # comes. The answer ends here; any further byte is out of step.
            self.head_tail_ok = status == 204 or status == 304 or declared == 0
            self.parser_dirty = True
            self._complete()

    def _complete(self) -> None:
        self.state = _DONE
        self.served += 1
        stream = self.stream
        if stream is not None:
            stream._finish()
            return
        self._resolve()

    def _resolve(self) -> None:
        waiter = self.waiter
        parts = self.parts
        if waiter is not None and not waiter.done():
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            waiter.set_result(H1Response(self.status, self.reason, self.headers, body, self.trailers, self.version))
        parts.clear()  # an idle connection holds no answer's bytes

    def _abort(self, exc: BaseException) -> _Abort:
        self.error = exc
        return _Abort()

    def _flags(self) -> tuple[bool, bool, bool]:
        return self.served > 0, self.got_bytes, True

    # used by the pool

    def begin(self, is_head: bool, max_body: int | None, streaming: bool) -> asyncio.Future[Any]:
        """Get ready for the answer to a request about to be written; the future resolves to it."""
        if self.parser_dirty:
            self.parser = httptools.HttpResponseParser(self)
            self.parser_dirty = False
        self.state = _HEAD
        self.generation += 1
        self.is_head = is_head
        self.max_body = max_body
        self.streaming = streaming
        self.stream = None
        self.got_bytes = False
        self.body_sent = True
        self.interim = 0
        self.error = None
        self.fed = 0
        self.head_tail_ok = False
        if self.parts:  # left by an answer that failed midway (the connection is closed then anyway)
            self.parts = []
        self.body_len = 0
        waiter = self.waiter = self.loop.create_future()
        return waiter

    def write(self, data: bytes) -> None:
        if self.transport is not None and self.state != _CLOSED:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is full; raise if the connection is gone."""
        while self.write_paused and self.state != _CLOSED:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None
        if self.state == _CLOSED:
            raise ConnectionFailed("upstream connection closed while sending the request body", *self._flags())

    def send_body(self, generation: int, data: bytes) -> bool:
        """Write part of a streamed request body; false when that exchange is over."""
        if generation != self.generation or self.state == _CLOSED or self.state == _IDLE:
            return False
        self.write(data)
        return True

    def body_done(self, generation: int) -> None:
        if generation == self.generation:
            self.body_sent = True

    def fail_request(self, generation: int, exc: BaseException) -> None:
        """The request could not be sent whole: the caller hears of it unless its answer is already complete."""
        if generation != self.generation:
            return
        self.body_sent = False
        if self.state == _HEAD or self.state == _BODY:
            self._fail(exc)
        elif self.state == _DONE:
            self.drop()

    def pause_reading(self) -> None:
        if self.transport is not None and self.state != _CLOSED:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.state != _CLOSED:
            self.transport.resume_reading()

    def drop(self) -> None:
        """Close for good; the connection is never used again."""
        if self.state == _IDLE:
            self.pool._forget(self)
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()  # no flushing: whatever is unsent is moot
        self._wake_drain()

    def _fail(self, exc: BaseException) -> None:
        """End the exchange with an error (the caller hears of it) and close the connection."""
        waiter = self.waiter
        stream = self.stream
        self.drop()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif stream is not None:
            stream._fail(exc)

    def _out_of_step(self, what: str) -> None:
        # Debug, not warning: Triton itself sends a body after its 405 to HEAD, so any client can cause this.
        log.debug("upstream %s:%s: %s; connection closed", self.pool.host, self.pool.port, what)
        self.drop()

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class H1Pool:
    """Keep-alive connections to one origin; at most ``size`` open at once, idle ones reused LIFO."""

    def __init__(self, base_url: str, size: int, connect_timeout: float, *, idle_timeout: float = 30.0,
                 max_header_bytes: int = 65536, keep_alive: bool = True) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.fragment:
            # Targets are sent exactly as given: a path prefix here would be silently dropped.
            raise ValueError(f"upstream URL must be http[s]://host[:port], not {base_url!r}")
        https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if https else 80)
        self.ssl: ssl_module.SSLContext | None = ssl_module.create_default_context() if https else None
        authority = parts.netloc.rpartition("@")[2]  # never forward credentials in Host
        self.host_header = authority.encode("ascii") if authority.isascii() else authority.encode("idna")
        self.size = size
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_header_bytes = max_header_bytes
        self.keep_alive = keep_alive
        self._idle: list[_Conn] = []  # oldest first: LIFO reuse, expiry from the front
        self._in_use = 0
        self._slots = asyncio.Semaphore(size)
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (f"<H1Pool {self.host}:{self.port} idle={len(self._idle)} in_use={self._in_use} "
                f"size={self.size}{' closed' if self._closed else ''}>")

    @property
    def idle(self) -> int:
        """Connections kept alive, waiting for a request."""
        return len(self._idle)

    @property
    def in_use(self) -> int:
        """Callers holding a slot now (connecting, exchanging, or reading a stream)."""
        return self._in_use

    async def request(self, method: str, target: bytes | str, headers: HeaderInput, body: bytes = b"", *,
                      max_body: int | None = None, deadline: float | None = None) -> H1Response:
        """One whole exchange. Raises ConnectionFailed (ProtocolError), BodyTooLarge, ValueError for
        a request that cannot be written, TimeoutError past ``deadline`` (absolute, on the loop's clock);
        cancellation and timeouts close the connection.

        The deadline is one timer on the loop, not ``asyncio.timeout``: this is the inference hot path,
        and a timeout context costs several times more (task lookups, a syscall per loop lookup)."""
        # RFC 9110 8.6: no Content-Length where the method does not anticipate content.
        framing = b"Content-Length: %d\r\n" % len(body) if body or method not in _NO_BODY_METHODS else b""
        head = self._head(method, target, headers, framing)
        payload = head + body if len(body) <= _JOIN_LIMIT else None
        is_head = method == "HEAD"
        await self._acquire(deadline)
        self._in_use += 1
        try:
            conn = self._take_idle()
            if conn is not None:
                waiter = _send(conn, is_head, max_body, payload, head, body)
                try:
                    response: H1Response = await _until(waiter, deadline)
                except ConnectionFailed as e:
                    conn.drop()
                    if e.got_bytes or not e.reused:
                        raise
                    log.debug("upstream %s:%s closed a kept-alive connection; retrying on a new one",
                              self.host, self.port)
                except BaseException:
                    conn.drop()  # cancelled, timed out, or too large: a late answer must reach no one
                    raise
                else:
                    self._release(conn)
                    return response
            conn = await self._connect(deadline)
            waiter = _send(conn, is_head, max_body, payload, head, body)
            try:
                response = await _until(waiter, deadline)
            except BaseException:
                conn.drop()
                raise
            self._release(conn)
            return response
        finally:
            self._in_use -= 1
            self._slots.release()

    async def _acquire(self, deadline: float | None) -> None:
        """Take a connection slot. Waiting for one counts against the deadline: with the server frozen, every
        slot may be held by a call waiting out its own deadline."""
        if deadline is None or not self._slots.locked():
            await self._slots.acquire()  # free now: taken without suspending, and without a timer
            return
        async with asyncio.timeout_at(deadline):
            await self._slots.acquire()

    def stream(self, method: str, target: bytes | str, headers: HeaderInput,
               body: bytes | AsyncIterable[bytes] | None, *, content_length: int | None = None
               ) -> contextlib.AbstractAsyncContextManager[H1Stream]:
        """Open an exchange whose answer is read as it arrives (pass-through).

        ``body``: ``None`` sends no body and no Content-Length; ``bytes`` is sent with its length;
        an async iterable is sent as it comes, chunked unless ``content_length`` is given (then it
        must yield exactly that many bytes, or RequestBodyError). The answer may begin before the
        body is all sent. Exiting the context before every byte of the answer was read closes
        the connection. No retry: the caller decides.
        """
        if isinstance(body, bytes | bytearray | memoryview):
            if content_length is not None and content_length != len(body):
                raise ValueError("content_length does not match the body")
            framing = b"Content-Length: %d\r\n" % len(body)
        elif body is None:
            if content_length:
                raise ValueError("content_length given without a body")
            framing = b""
        elif content_length is None:
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            if content_length < 0:
                raise ValueError("negative content_length")
            framing = b"Content-Length: %d\r\n" % content_length
        head = self._head(method, target, headers, framing)
        return self._stream(method == "HEAD", head, body, content_length)

    @contextlib.asynccontextmanager
    async def _stream(self, is_head: bool, head: bytes, body: bytes | AsyncIterable[bytes] | None,
                      content_length: int | None) -> AsyncIterator[H1Stream]:
        async with self._slots:
            self._in_use += 1
            conn: _Conn | None = None
            sender: asyncio.Task[None] | None = None
            try:
                conn = self._take_idle() or await self._connect()
                waiter = conn.begin(is_head, None, streaming=True)
                sender = self._send_request(conn, head, body, content_length)
                stream: H1Stream = await waiter
                try:
                    yield stream
                finally:
                    consumed = stream._drained
                    stream._detach()
            except BaseException:
                if conn is not None:
                    conn.drop()
                raise
            finally:
                self._in_use -= 1
                if sender is not None and not sender.done():
                    sender.cancel()  # the answer is complete or abandoned: the rest of the body is moot
            if consumed and (sender is None or sender.done()):
                self._release(conn)
            else:
                conn.drop()

    @staticmethod
    def _send_request(conn: _Conn, head: bytes, body: bytes | AsyncIterable[bytes] | None,
                      content_length: int | None) -> asyncio.Task[None] | None:
        """Write the request; a streamed body goes on in a task, as the answer may come first."""
        if body is None or isinstance(body, bytes | bytearray | memoryview):
            conn.write(head + bytes(body) if body else head)
            return None
        conn.write(head)
        conn.body_sent = False
        return asyncio.get_running_loop().create_task(_send_body(conn, conn.generation, body, content_length))

    def close(self) -> None:
        """Close idle connections now; those in use close when their exchange ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.drop_idle()

    def drop_idle(self) -> None:
        """Close the idle connections (the pool stays open): a server shutting down waits for its open
        connections before it exits, and keeps answering on them meanwhile."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.drop()

    # connections

    async def _connect(self, deadline: float | None = None) -> _Conn:
        """A new connection within ``connect_timeout``; TimeoutError when ``deadline`` comes first."""
        if self._closed:
            raise ConnectionFailed("upstream pool is closed")
        loop = asyncio.get_running_loop()
        where = f"{self.host}:{self.port}"
        limit = loop.time() + self.connect_timeout
        caller_first = deadline is not None and deadline < limit
        try:
            async with asyncio.timeout_at(limit if deadline is None else min(limit, deadline)):
                _, conn = await loop.create_connection(lambda: _Conn(self, loop), self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            if caller_first:
                raise  # the caller's own deadline passed: a late answer, not an unreachable server
            raise ConnectionFailed(f"cannot connect to {where} (timed out)") from None
        except OSError as e:
            raise ConnectionFailed(f"cannot connect to {where} ({e.strerror or e})") from None
        return conn

    def _take_idle(self) -> _Conn | None:
        idle = self._idle
        if not idle:
            return None
        expired = idle[-1].loop.time() - self.idle_timeout
        while idle:
            conn = idle.pop()  # most recently used: least likely to have been closed by the server
            transport = conn.transport
            if (conn.state == _IDLE and transport is not None and not transport.is_closing()
                    and conn.idle_since > expired):
                return conn
            conn.drop()
        return None

    def _release(self, conn: _Conn) -> None:
        """Pool the connection if its exchange ended cleanly (rule 1 of the module docstring), else close it."""
        transport = conn.transport
        if (conn.state != _DONE or not conn.keep_alive or not self.keep_alive or not conn.body_sent or self._closed
                or transport is None
                or transport.is_closing() or transport.get_write_buffer_size()):
            conn.drop()
            return
        now = conn.loop.time()
        conn.state = _IDLE
        conn.idle_since = now
        conn.waiter = None
        conn.stream = None
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_at(now + self.idle_timeout, self._sweep)

    def _forget(self, conn: _Conn) -> None:
        """An idle connection closed (by the server, or for being out of step): drop it from the pool."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        idle = self._idle
        if not idle:
            return
        loop = idle[0].loop
        expired = loop.time() - self.idle_timeout
        while idle and idle[0].idle_since <= expired:
            idle.pop(0).drop()
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + self.idle_timeout, self._sweep)

    # request heads

    def _head(self, method: str, target: bytes | str, headers: HeaderInput, framing: bytes) -> bytes:
        """The request line and header section, refusing anything that could split or smuggle."""
        raw_method = _METHODS.get(method) or _method(method)
        raw_target = target.encode("utf-8", "surrogateescape") if isinstance(target, str) else target
        if not raw_target or _BAD_TARGET.search(raw_target) or not (raw_target[0] == 0x2F or raw_target == b"*"):
            raise ValueError("invalid request target")
        lines: list[bytes] = []
        host = self.host_header
        for name, value in headers:
            raw_name = _NAMES.get(name)
            if raw_name is None:
                raw_name = _name(name)
            raw_value = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            if raw_name is _SKIP:
                if len(name) == 4 and name.lower() in (b"host", "host"):
                    host = raw_value  # the client's Host goes on, as proxies keep it (checked with the rest below)
                continue  # the pool writes the framing itself
            lines += (raw_name, b": ", raw_value, b"\r\n")
        if host is not self.host_header and not _FIELD_VALUE.fullmatch(host):
            raise ValueError("invalid byte in the Host header")
        fields = b"".join(lines)
        # Names are checked tokens; values may hold no CTL but HTAB. Every CR LF must be one of the
        # line ends written above, or a value could start a header (or a request) of its own.
        if fields and (not _FIELD_LINES.fullmatch(fields) or fields.count(b"\r\n") != len(lines) >> 2):
            raise ValueError("invalid byte in a header value")
        return b"".join((raw_method, b" ", raw_target, b" HTTP/1.1\r\nHost: ", host, b"\r\n", fields,
                         framing, b"\r\n"))


_METHODS: dict[str, bytes] = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
# Header names seen before, checked: name as given -> bytes to send (_SKIP: one the pool writes itself).
_NAMES: dict[bytes | str, bytes] = {}
_NAMES_MAX: Final = 1024
_SKIP: Final = b""
_FIELD_LINES: Final = re.compile(rb"(?:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_FIELD_VALUE: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")


def _method(method: str) -> bytes:
    raw = method.encode("ascii", "replace")
    if not _TOKEN.fullmatch(raw):
        raise ValueError("invalid request method")
    return raw


def _name(name: bytes | str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
    if not _TOKEN.fullmatch(raw):
        raise ValueError("invalid header name")
    result = _SKIP if raw.lower() in _POOL_HEADERS else raw
    if len(_NAMES) < _NAMES_MAX:  # bounded: names are chosen by clients
        _NAMES[name] = result
    return result


async def _until(waiter: asyncio.Future[Any], deadline: float | None) -> Any:
    """``await waiter``, or TimeoutError once the loop's clock passes ``deadline``."""
    if deadline is None:
        return await waiter
    timer = waiter.get_loop().call_at(deadline, _expire, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _send(conn: _Conn, is_head: bool, max_body: int | None, payload: bytes | None, head: bytes,
          body: bytes) -> asyncio.Future[Any]:
    """Write a whole request; the future resolves to its answer."""
    waiter = conn.begin(is_head, max_body, streaming=False)
    if payload is not None:
        conn.write(payload)  # one segment
    else:
        conn.write(head)
        conn.write(body)
    return waiter


async def _send_body(conn: _Conn, generation: int, body: AsyncIterable[bytes], content_length: int | None) -> None:
    """Write a streamed request body while the answer may already be arriving."""
    sent = 0
    try:
        async for chunk in body:
            if not chunk:
                continue  # an empty chunk would end a chunked body early
            if content_length is None:
                data = b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                sent += len(chunk)
                if sent > content_length:
                    raise RequestBodyError(f"request body longer than its content_length {content_length}")
                data = bytes(chunk)
            if not conn.send_body(generation, data):
                return
            await conn.drain()
        if content_length is None:
            if not conn.send_body(generation, b"0\r\n\r\n"):
                return
        elif sent != content_length:
            raise RequestBodyError(f"request body shorter than its content_length {content_length}")
        conn.body_done(generation)
    except ConnectionFailed:
        pass  # the connection broke: the answer side reports it
    except asyncio.CancelledError:
        conn.fail_request(generation, ConnectionFailed("sending the request body was cancelled", *conn._flags()))
        raise
    except Exception as exc:  # the caller's iterable failed, or gave the wrong length
        conn.fail_request(generation, exc)
