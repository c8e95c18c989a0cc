"""A raw-socket HTTP/1.1 client for tests that must send bytes no well-behaved client would."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import httptools

from tests.servers import HOST


@dataclass
class RawAnswer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    interim: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _Collector:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done = False
        self.headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class RawClient:
    """One connection. ``send`` raw bytes; ``answer`` reads one whole response (skipping 1xx)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def interim(self, timeout: float) -> bytes:
        """Bytes that arrive within ``timeout`` seconds (for 100 Continue)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        finally:
            self.sock.settimeout(10.0)
        return data

    def answer(self, head_request: bool = False) -> RawAnswer:
        interim: list[int] = []
        while True:
            collector = _Collector()
            parser = httptools.HttpResponseParser(collector)
            data, self._pending = self._pending, b""
            while True:
                if data:
                    try:
                        parser.feed_data(data)
                    except httptools.HttpParserError:
                        raise
                    data = b""
                if collector.done or (head_request and collector.headers_done):
                    break
                chunk = self.sock.recv(65536)
                if not chunk:
                    if collector.headers_done and not collector.done:
                        break  # close-delimited
                    raise ConnectionError("connection closed before a complete answer")
                data = chunk
            status = parser.get_status_code()
            if 100 <= status < 200:
                interim.append(status)
                continue
            return RawAnswer(status, collector.headers, bytes(collector.body), interim)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (reads EOF) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False


def exchange_raw(port: int, data: bytes, timeout: float = 10.0) -> RawAnswer:
    with RawClient(port, timeout) as client:
        client.send(data)
        return client.answer()
