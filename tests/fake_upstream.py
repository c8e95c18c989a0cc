"""A scripted HTTP/1.1 peer standing in for the model server where a real one cannot misbehave on demand.

It records every request exactly as it arrived (raw bytes) and answers through ``behaviour``:
``"triton"`` (healthy: health 200, an empty repository index, 200 with a small JSON body elsewhere),
``"odd"`` (answers that are not Triton's: a status line that is not HTTP), ``"down"`` (closes every
connection at once). Standard library only; one thread per connection.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

from tests.servers import HOST

Answer = Callable[[bytes, bytes, bytes], bytes]  # (method, target, body) -> raw response bytes

OK_BODY = b'{"ok":true}'


def http_answer(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, content_type, len(body),
                                                                                 body)


def triton_like(method: bytes, target: bytes, body: bytes) -> bytes:
    if target.startswith(b"/v2/health/"):
        return http_answer(200, b"", b"text/plain")
    if target == b"/v2/repository/index":
        return http_answer(200, b"[]")
    return http_answer(200, OK_BODY)


class FakeUpstream:
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.behaviour = "triton"
        self.answer: Answer = triton_like
        self._lock = threading.Lock()
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                fake._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((HOST, 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests_for(self, prefix: bytes) -> list[bytes]:
        with self._lock:
            return [r for r in self.received if r.split(b" ", 2)[1:2] and r.split(b" ", 2)[1].startswith(prefix)]

    def _serve(self, sock: socket.socket) -> None:
        buffer = b""
        sock.settimeout(30)
        try:
            while True:
                if self.behaviour == "down":
                    return
                head_end = buffer.find(b"\r\n\r\n")
                while head_end < 0:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    head_end = buffer.find(b"\r\n\r\n")
                head, buffer = buffer[: head_end + 4], buffer[head_end + 4:]
                read = _read_chunked if _is_chunked(head) else _read_sized
                framed = read(sock, buffer, _content_length(head))
                if framed is None:
                    return
                body, buffer = framed
                with self._lock:
                    self.received.append(head + body)
                method, target = head.split(b" ", 2)[:2]
                if self.behaviour == "odd":
                    sock.sendall(b"SPDY/9 what is this\r\n\r\n")
                    return
                sock.sendall(self.answer(method, target, body))
        except OSError:
            return
        finally:
            sock.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _is_chunked(head: bytes) -> bool:
    return any(line.partition(b":")[0].strip().lower() == b"transfer-encoding" for line in head.split(b"\r\n")[1:])


def _fill(sock: socket.socket, buffer: bytes, size: int) -> bytes | None:
    """At least ``size`` bytes buffered, or None when the peer closed first."""
    while len(buffer) < size:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    return buffer


def _read_sized(sock: socket.socket, buffer: bytes, length: int) -> tuple[bytes, bytes] | None:
    filled = _fill(sock, buffer, length)
    return None if filled is None else (filled[:length], filled[length:])


def _read_chunked(sock: socket.socket, buffer: bytes, _: int) -> tuple[bytes, bytes] | None:
    """A chunked body read to its end, as a model server does before it answers (trailers ignored)."""
    body = b""
    while True:
        while b"\r\n" not in buffer:
            more = _fill(sock, buffer, len(buffer) + 1)
            if more is None:
                return None
            buffer = more
        size_line, buffer = buffer.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while not buffer.startswith(b"\r\n") and b"\r\n\r\n" not in buffer:
                more = _fill(sock, buffer, len(buffer) + 1)
                if more is None:
                    return None
                buffer = more
            end = 2 if buffer.startswith(b"\r\n") else buffer.index(b"\r\n\r\n") + 4
            return body, buffer[end:]
        filled = _fill(sock, buffer, size + 2)
        if filled is None:
            return None
        body, buffer = body + filled[:size], filled[size + 2:]
