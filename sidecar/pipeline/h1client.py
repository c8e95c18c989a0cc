"""A lean HTTP/1.1 keep-alive client for the inference hot path.

aiohttp's client costs ~100 us of Python per call (request objects, URL parsing,
timers, tracing hooks); this one writes the request with one ``writelines`` and
parses the answer with httptools (llhttp, the parser uvicorn uses). Bodies are
always whole ``bytes`` here: the inference path has already buffered them.

Safety rules (redis-py CVE-2023-28858 is the cautionary tale): a connection goes
back to the pool only after a complete response on a keep-alive connection; a
call that is cancelled or times out closes its connection, so no later caller
can ever read an answer meant for someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

_JOIN_LIMIT = 256 * 1024


@dataclass(slots=True)
class H1Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class ConnectionFailed(Exception):
    """Could not connect, or the connection broke before a complete response.

    ``reused``: the connection had served before (it may have been closed by the server while idle);
    ``got_bytes``: some of the response had arrived (the request surely reached the server).
    """

    def __init__(self, message: str, reused: bool, got_bytes: bool) -> None:
        super().__init__(message)
        self.reused = reused
        self.got_bytes = got_bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.served = 0
        self.closed = False
        # httptools answers should_keep_alive() only inside its callbacks: remember it there.
        self.keep_alive = False
        self._waiter: asyncio.Future[H1Response] | None = None
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._got_bytes = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._waiter is None:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"malformed response from model server ({e})")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail("connection closed before a complete response")

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim 1xx answer: the final one follows
            self._headers, self._body = [], []
            return
        self.keep_alive = self.parser.should_keep_alive()
        waiter.set_result(H1Response(status, self._headers, b"".join(self._body)))

    # use
    def _fail(self, message: str) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionFailed(message, reused=self.served > 0, got_bytes=self._got_bytes))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, head: bytes, body: bytes) -> H1Response:
        if self.transport is None:
            raise ConnectionFailed("connection not established", reused=False, got_bytes=False)
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._headers, self._body, self._got_bytes = [], [], False
        self.keep_alive = False
        if len(body) <= _JOIN_LIMIT:
            self.transport.write(head + body)  # one segment; copying a small body is cheaper than a syscall
        else:
            self.transport.writelines((head, body))
        try:
            response = await self._waiter
        finally:
            self._waiter = None
        self.served += 1
        return response


class H1Pool:
    """Keep-alive connections to one origin; at most ``size`` open at once."""

    def __init__(self, base_url: str, size: int, connect_timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        https = parts.scheme == "https"
        self.ssl: ssl_module.SSLContext | None = ssl_module.create_default_context() if https else None
        self.host_header = parts.netloc.encode("latin-1")
        self.size = size
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    def __repr__(self) -> str:
        return f"<H1Pool {self.host}:{self.port} idle={len(self._idle)} size={self.size}>"

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port} (timed out)", False, False) from None
        except OSError as e:
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port} ({e.strerror or e})", False,
                                   False) from None
        return conn

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # most recently used: least likely to have been closed by the server
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> H1Response:
        """One exchange. Raises ConnectionFailed; timeouts/cancellation propagate (connection closed)."""
        head = self._head(method, target, headers, len(body))
        async with self._slots:
            conn = self._take_idle() or await self._connect()
            try:
                response = await conn.exchange(head, body)
            except BaseException:
                conn.close()
                raise
            if conn.keep_alive and not conn.closed:
                self._idle.append(conn)
            else:
                conn.close()
            return response

    def _head(self, method: str, target: str, headers: list[tuple[str, str]], length: int) -> bytes:
        # aiohttp decodes header bytes as UTF-8 with surrogateescape; this restores them exactly.
        lines = [f"{method} {target} HTTP/1.1\r\n".encode(), b"Host: ", self.host_header, b"\r\n"]
        lines.extend(f"{k}: {v}\r\n".encode("utf-8", "surrogateescape") for k, v in headers)
        lines.append(b"Content-Length: %d\r\n\r\n" % length)
        return b"".join(lines)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
