"""The upstream HTTP/1.1 client (sidecar/upstream/h1.py) against a scripted raw-socket upstream.

The upstream is a real asyncio server whose behaviour on each accepted connection is a script
(read a request, send these bytes in these pieces, close or keep), in the manner of httpcore's
mock backend. Parser-level properties (every split offset) drive a connection object directly
with a fake transport, which is deterministic where TCP segmentation is not. Tests wait on
events and conditions under deadlines, never on sleeps; the only sleeps are a scripted
upstream being slow on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.upstream import h1
from sidecar.upstream.h1 import (
    BodyTooLarge,
    ConnectionFailed,
    H1Pool,
    H1Response,
    ProtocolError,
    RequestBodyError,
)

DEADLINE = 5.0  # no single wait in these tests should come anywhere near it


# --------------------------------------------------------------------------- scripted upstream


@dataclass
class Req:
    """A request as the upstream received it."""

    method: str = ""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    head_done: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class Peer:
    """The upstream's side of one connection. It reads in the background (until told to stop),
    so that a client closing the connection is noticed whatever the script is doing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()  # every byte the client sent on this connection
        self.requests: list[Req] = []
        self.eof = asyncio.Event()  # the connection ended (the client closed it, unless the script did)
        self.received = asyncio.Event()  # a whole request has arrived
        self.reading = asyncio.Event()
        self.reading.set()
        self.closed = False
        self._progress = asyncio.Event()
        self._complete: deque[Req] = deque()
        self._parser = httptools.HttpRequestParser(self)
        self._task = asyncio.create_task(self._read_loop())

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.requests.append(Req())

    def on_url(self, url: bytes) -> None:
        self.requests[-1].target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.requests[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.requests[-1].method = self._parser.get_method().decode()
        self.requests[-1].head_done = True

    def on_body(self, body: bytes) -> None:
        self.requests[-1].body += body

    def on_message_complete(self) -> None:
        self._complete.append(self.requests[-1])
        self.received.set()

    async def _read_loop(self) -> None:
        try:
            while True:
                await self.reading.wait()
                data = await self.reader.read(65536)
                if not data:
                    return
                self.raw += data
                self._parser.feed_data(data)
                self._progress.set()
        except ConnectionError:
            pass
        finally:
            self.eof.set()
            self._progress.set()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            if self.eof.is_set():
                raise EOFError("client closed the connection")
            self._progress.clear()
            await self._progress.wait()

    # script actions
    async def recv(self) -> Req:
        await self._until(lambda: bool(self._complete))
        return self._complete.popleft()

    async def recv_head(self) -> Req:
        await self._until(lambda: bool(self.requests) and self.requests[-1].head_done)
        return self.requests[-1]

    def stop_reading(self) -> None:
        self.reading.clear()

    async def send(self, data: bytes, splits: Sequence[int] = (), pause: float = 0.0) -> None:
        for i, piece in enumerate(cut(data, splits)):
            if i and pause:
                await asyncio.sleep(pause)  # the upstream is slow on purpose
            if self.writer.transport.is_closing():  # uvloop raises on writing to a closed transport
                raise EOFError("client closed the connection")
            self.writer.write(piece)
            await self.writer.drain()

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    async def finish(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


Script = Callable[[Peer], Awaitable[None]]


async def serve(peer: Peer) -> None:
    """The default script: answer every request with its own method, target and body."""
    while True:
        req = await peer.recv()
        await peer.send(ok(echo(req)))


def echo(req: Req) -> bytes:
    return b"%s %s %s" % (req.method.encode(), req.target, req.body)


class Upstream:
    """A raw-socket HTTP upstream; each connection runs the next queued script (else ``serve``)."""

    def __init__(self, default: Script = serve) -> None:
        self.default = default
        self.scripts: deque[Script] = deque()
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.connected = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def script(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        self.connected.set()
        script = self.scripts.popleft() if self.scripts else self.default
        try:
            await script(peer)
            if not peer.closed:
                await peer.eof.wait()  # keep the connection until the client closes it
        except (EOFError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a script's own assertion failed: the test must hear of it
            self.errors.append(e)
        finally:
            writer.close()
            await peer.finish()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


def cut(data: bytes, splits: Sequence[int]) -> list[bytes]:
    points = [0, *sorted(splits), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [b""]


def ok(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


def chunked(pieces: Sequence[bytes], trailers: Sequence[bytes] = ()) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n"
            + b"".join(t + b"\r\n" for t in trailers) + b"\r\n")


def steps(*actions: Callable[[Peer], Awaitable[Any]]) -> Script:
    async def run(peer: Peer) -> None:
        for action in actions:
            await action(peer)

    return run


def expect() -> Callable[[Peer], Awaitable[Any]]:
    return lambda peer: peer.recv()


def reply(data: bytes, splits: Sequence[int] = (), pause: float = 0.0) -> Callable[[Peer], Awaitable[None]]:
    return lambda peer: peer.send(data, splits, pause)


def close() -> Callable[[Peer], Awaitable[None]]:
    async def run(peer: Peer) -> None:
        peer.close()

    return run


def wait(event: asyncio.Event) -> Callable[[Peer], Awaitable[Any]]:
    return lambda peer: event.wait()


async def until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Wait for a condition the code under test gives no event for (a pool's bookkeeping)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - no event exists for these; polled under a deadline
            await asyncio.sleep(0.001)


async def within(aw: Awaitable[Any], timeout: float = DEADLINE) -> Any:
    async with asyncio.timeout(timeout):
        return await aw


@pytest.fixture()
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream().start()
    yield up
    await up.close()
    assert not up.errors, up.errors


@pytest.fixture()
async def pool(upstream: Upstream) -> AsyncIterator[H1Pool]:
    p = H1Pool(upstream.url, 4, 1.0)
    yield p
    p.close()


async def get(pool: H1Pool, target: str, **kw: Any) -> H1Response:
    response: H1Response = await within(pool.request("GET", target, [], **kw))
    return response


async def read_all(pool: H1Pool, method: str, target: str, body: Any = None, **kw: Any) -> tuple[Any, bytes]:
    async with pool.stream(method, target, [], body, **kw) as s:
        data = b"".join([chunk async for chunk in s])
    return s, data


# --------------------------------------------------------------------------- requests on the wire


async def test_request_bytes_on_the_wire(upstream: Upstream, pool: H1Pool) -> None:
    surrogate = b"\xff".decode("utf-8", "surrogateescape")  # how aiohttp hands over a non-UTF-8 byte
    headers: list[tuple[bytes | str, bytes | str]] = [
        ("x-request-id", "abc"), (b"X-Raw", b"caf\xc3\xa9 \xff"), ("x-surrogate", surrogate)]
    r = await within(pool.request("POST", "/v2/m%20x/infer?a=%2F&b", headers, b"abc"))
    assert r.status == 200 and r.body == b"POST /v2/m%20x/infer?a=%2F&b abc"
    host = upstream.url.removeprefix("http://").encode()
    assert bytes(upstream.peers[0].raw) == (
        b"POST /v2/m%20x/infer?a=%2F&b HTTP/1.1\r\nHost: " + host + b"\r\nx-request-id: abc\r\n"
        b"X-Raw: caf\xc3\xa9 \xff\r\nx-surrogate: \xff\r\nContent-Length: 3\r\n\r\nabc"
    )


async def test_get_without_body_sends_no_content_length(upstream: Upstream, pool: H1Pool) -> None:
    await get(pool, "/v2/health/ready")
    assert b"Content-Length" not in upstream.peers[0].raw
    await within(pool.request("POST", "/x", []))
    assert upstream.peers[0].requests[1].header(b"content-length") == b"0"


async def test_pool_writes_the_framing_itself_and_keeps_the_clients_host(upstream: Upstream, pool: H1Pool) -> None:
    headers = [("Host", "models.example:8000"), ("Content-Length", "999"), ("transfer-encoding", "chunked"),
               ("x-kept", "1")]
    r = await within(pool.request("POST", "/x", headers, b"hi"))
    assert r.body == b"POST /x hi"
    req = upstream.peers[0].requests[0]
    assert req.header(b"host") == b"models.example:8000"  # as HAProxy and Envoy keep it
    assert req.header(b"content-length") == b"2" and req.header(b"transfer-encoding") is None
    assert req.header(b"x-kept") == b"1"
    await within(pool.request("GET", "/y", []))
    assert upstream.peers[0].requests[1].header(b"host") == upstream.url.removeprefix("http://").encode()


async def test_a_host_header_that_could_split_the_request_is_refused(upstream: Upstream, pool: H1Pool) -> None:
    with pytest.raises(ValueError):
        await pool.request("GET", "/", [(b"Host", b"a\r\nX-Injected: 1")])


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/a b", []),
        ("GET", "/a\r\nX: y", []),
        ("GET", b"/a\x00", []),
        ("GET", "/a\x7f", []),
        ("GET", "", []),
        ("GET", "http://elsewhere/", []),
        ("GE T", "/", []),
        ("GET\r\n", "/", []),
        ("GET", "/", [("x\r\ny", "1")]),
        ("GET", "/", [("x y", "1")]),
        ("GET", "/", [("x:y", "1")]),
        ("GET", "/", [("", "1")]),
        ("GET", "/", [("x", "a\r\nInjected: 1")]),
        ("GET", "/", [("x", "a\nb")]),
        ("GET", "/", [("x", "a\rb")]),
        ("GET", "/", [("x", b"a\x00b")]),
        ("GET", "/", [("x", b"a\x01b")]),
        ("GET", "/", [("x", "a\x7fb")]),
    ],
)
async def test_refuses_requests_that_could_split(pool: H1Pool, method: str, target: Any, headers: Any) -> None:
    with pytest.raises(ValueError):
        await pool.request(method, target, headers)
    with pytest.raises(ValueError):
        pool.stream(method, target, headers, None)
    assert pool.in_use == 0


async def test_tab_and_obs_text_in_values_are_sent(upstream: Upstream, pool: H1Pool) -> None:
    await within(pool.request("GET", "*", [("x", b"a\tb\x80\xff")]))
    assert upstream.peers[0].requests[0].header(b"x") == b"a\tb\x80\xff"


# --------------------------------------------------------------------------- keep-alive and reuse


async def test_keep_alive_reuses_one_connection(upstream: Upstream, pool: H1Pool) -> None:
    for i in range(5):
        r = await get(pool, f"/{i}")
        assert r.body == b"GET /%d " % i
    assert len(upstream.peers) == 1 and pool.idle == 1
    assert "127.0.0.1" in repr(pool) and "idle=1" in repr(pool) and "in_use=0" in repr(pool)


async def test_headers_are_never_shared_between_answers(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"1", b"X-A: 1")), expect(), reply(ok(b"2", b"X-B: 2"))))
    r1 = await get(pool, "/1")
    before = list(r1.headers)
    r2 = await get(pool, "/2")
    assert r1.headers is not r2.headers and r1.trailers is not r2.trailers
    assert r1.headers == before and (b"X-B", b"2") not in r1.headers and (b"X-A", b"1") not in r2.headers


async def test_stale_bytes_on_an_idle_connection_close_it(upstream: Upstream, pool: H1Pool) -> None:
    stale = ok(b"not yours")
    upstream.script(steps(expect(), reply(ok(b"first")), reply(stale)))
    assert (await get(pool, "/1")).body == b"first"
    await within(upstream.peers[0].eof.wait())  # the client noticed and closed it
    assert pool.idle == 0
    r = await get(pool, "/2")
    assert r.body == b"GET /2 " and len(upstream.peers) == 2


async def test_extra_bytes_after_a_complete_answer(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"mine") + b"garbage")))
    assert (await get(pool, "/1")).body == b"mine"
    await within(upstream.peers[0].eof.wait())
    assert pool.idle == 0
    assert (await get(pool, "/2")).body == b"GET /2 "


async def test_two_answers_to_one_request(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"mine") + ok(b"someone else's"))))
    assert (await get(pool, "/1")).body == b"mine"
    await within(upstream.peers[0].eof.wait())
    assert (await get(pool, "/2")).body == b"GET /2 "
    assert len(upstream.peers) == 2


async def test_server_closing_an_idle_connection_is_noticed(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"first")), close()))
    await get(pool, "/1")
    await until(lambda: pool.idle == 0)
    assert (await get(pool, "/2")).body == b"GET /2 "
    assert len(upstream.peers) == 2 and len(upstream.peers[0].requests) == 1


async def test_idle_connections_expire(upstream: Upstream) -> None:
    pool = H1Pool(upstream.url, 4, 1.0, idle_timeout=0.05)
    try:
        await get(pool, "/1")
        await within(upstream.peers[0].eof.wait())
        assert pool.idle == 0
        assert (await get(pool, "/2")).body == b"GET /2 "
    finally:
        pool.close()


async def test_close_drops_idle_connections_and_refuses_new_ones(upstream: Upstream, pool: H1Pool) -> None:
    await get(pool, "/1")
    pool.close()
    await within(upstream.peers[0].eof.wait())
    with pytest.raises(ConnectionFailed):
        await get(pool, "/2")
    assert "closed" in repr(pool)


@pytest.mark.parametrize("url", ["ftp://h", "http://h:1/prefix", "http://h:1/?q", "h:1"])
def test_base_url_must_be_an_origin(url: str) -> None:
    with pytest.raises(ValueError):
        H1Pool(url, 1, 1.0)


async def test_connect_failure() -> None:
    up = await Upstream().start()
    url = up.url
    await up.close()
    pool = H1Pool(url, 1, 1.0)
    with pytest.raises(ConnectionFailed) as e:
        await get(pool, "/")
    assert (e.value.reused, e.value.got_bytes, e.value.sent) == (False, False, False)
    assert pool.in_use == 0


# --------------------------------------------------------------------------- answers


async def test_interim_answers_are_skipped(upstream: Upstream, pool: H1Pool) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    upstream.script(steps(expect(), reply(interim + ok(b"final", b"X-F: 1"), splits=[10, 30], pause=0.001),
                          expect(), reply(ok(b"again"))))
    r = await get(pool, "/")
    assert (r.status, r.body) == (200, b"final")
    assert all(name != b"Link" for name, _ in r.headers) and (b"X-F", b"1") in r.headers
    assert (await get(pool, "/")).body == b"again"
    assert len(upstream.peers) == 1


async def test_switching_protocols_is_refused(upstream: Upstream, pool: H1Pool) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    upstream.script(steps(expect(), reply(switch)))
    with pytest.raises(ProtocolError):
        await get(pool, "/")
    await within(upstream.peers[0].eof.wait())


async def test_head_answer_has_no_body_and_keeps_the_connection(upstream: Upstream, pool: H1Pool) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: x\r\n\r\n"
    upstream.script(steps(expect(), reply(head), expect(), reply(head), expect(), reply(ok(b"after"))))
    r = await within(pool.request("HEAD", "/", []))
    assert (r.status, r.body) == (200, b"") and (b"Content-Length", b"1234") in r.headers
    async with pool.stream("HEAD", "/", [], None) as s:
        assert s.content_length is None and not s.has_body and not s.chunked and not s.close_delimited
        assert (b"Content-Length", b"1234") in s.headers and [c async for c in s] == []
    assert (await get(pool, "/")).body == b"after"
    assert len(upstream.peers) == 1


async def test_body_bytes_after_a_head_answer_close_the_connection(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")))
    r = await within(pool.request("HEAD", "/", []))
    assert r.body == b""
    await within(upstream.peers[0].eof.wait())
    assert (await get(pool, "/2")).body == b"GET /2 "


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_no_body_statuses(upstream: Upstream, pool: H1Pool, status: bytes) -> None:
    answer = b"HTTP/1.1 %s\r\nContent-Length: 5\r\nETag: x\r\n\r\n" % status
    upstream.script(steps(expect(), reply(answer), expect(), reply(ok(b"next"))))
    r = await get(pool, "/")
    assert r.body == b"" and r.status in (204, 304)
    assert (await get(pool, "/")).body == b"next"
    assert len(upstream.peers) == 1


async def test_chunked_with_trailers(upstream: Upstream, pool: H1Pool) -> None:
    answer = chunked([b"hel", b"lo ", b"world"], [b"X-Checksum: abc", b"X-Other: 1"])
    upstream.script(steps(expect(), reply(answer, splits=range(5, len(answer), 7), pause=0.0005),
                          expect(), reply(answer)))
    r = await get(pool, "/")
    assert r.body == b"hello world"
    assert r.trailers == [(b"X-Checksum", b"abc"), (b"X-Other", b"1")]
    assert r.headers == [(b"Transfer-Encoding", b"chunked")]
    s, data = await within(read_all(pool, "GET", "/"))
    assert data == b"hello world" and s.chunked and s.content_length is None
    assert s.trailers == [(b"X-Checksum", b"abc"), (b"X-Other", b"1")]
    assert len(upstream.peers) == 1


async def test_close_delimited_body(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\nuntil", splits=[22]), reply(b" the end"),
                          close()))
    r = await get(pool, "/")
    assert r.body == b"until the end"
    assert pool.idle == 0
    upstream.script(steps(expect(), reply(b"HTTP/1.1 200 OK\r\n\r\nstreamed"), close()))
    s, data = await within(read_all(pool, "GET", "/"))
    assert data == b"streamed" and s.close_delimited and s.content_length is None and not s.chunked
    assert pool.idle == 0


async def test_close_delimited_body_cut_by_reset_is_an_error(upstream: Upstream, pool: H1Pool) -> None:
    async def script(peer: Peer) -> None:
        await peer.recv()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\npartial")
        sock = peer.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        peer.writer.transport.abort()
        peer.closed = True

    upstream.script(script)
    with pytest.raises(ConnectionFailed):  # only a clean close ends such a body
        await get(pool, "/")


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, close\r\n\r\nok", False),
    ],
)
async def test_connection_persistence(upstream: Upstream, pool: H1Pool, answer: bytes, reused: bool) -> None:
    upstream.script(steps(expect(), reply(answer)))
    r = await get(pool, "/")
    assert r.body == b"ok" and r.http_version == answer[5:8].decode()
    assert pool.idle == (1 if reused else 0)


async def test_http10_close_delimited(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(b"HTTP/1.0 200 OK\r\n\r\nold school"), close()))
    r = await get(pool, "/")
    assert (r.body, r.http_version, pool.idle) == (b"old school", "1.0", 0)


MALFORMED = [
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX : a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n: a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX\x00Y: a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nBad Trailer: x\r\n\r\n",
]


@pytest.mark.parametrize("answer", MALFORMED, ids=range(len(MALFORMED)))
async def test_malformed_answers_are_protocol_errors(upstream: Upstream, pool: H1Pool, answer: bytes) -> None:
    upstream.script(steps(expect(), reply(answer)))
    with pytest.raises(ProtocolError) as e:
        await get(pool, "/")
    assert e.value.got_bytes
    await within(upstream.peers[0].eof.wait())
    assert pool.idle == 0 and pool.in_use == 0
    assert (await get(pool, "/next")).body == b"GET /next "


async def test_malformed_answer_is_not_retried_on_a_reused_connection(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"1")), expect(), reply(b"garbage\r\n\r\n")))
    await get(pool, "/1")
    with pytest.raises(ProtocolError) as e:
        await get(pool, "/2")
    assert e.value.reused and e.value.got_bytes and len(upstream.peers) == 1


async def test_oversize_header_section(upstream: Upstream) -> None:
    pool = H1Pool(upstream.url, 2, 1.0, max_header_bytes=1024)
    try:
        fits = ok(b"x", b"X-Big: " + b"a" * 900)
        one_big = ok(b"x", b"X-Big: " + b"a" * 2000)
        many = ok(b"x", *[b"X-%d: %s" % (i, b"b" * 40) for i in range(40)])
        trailers = chunked([b"x"], [b"X-T%d: %s" % (i, b"c" * 60) for i in range(30)])
        upstream.script(
            steps(expect(), reply(fits)),
            steps(expect(), reply(one_big)),
            steps(expect(), reply(one_big, splits=range(0, len(one_big), 100), pause=0.0005)),
            steps(expect(), reply(many)),
            steps(expect(), reply(trailers)),
        )
        assert (await get(pool, "/")).body == b"x"
        pool.close()  # the rest each on a connection of its own
        pool = H1Pool(upstream.url, 2, 1.0, max_header_bytes=1024)
        for _ in range(4):
            with pytest.raises(ProtocolError, match="too large"):
                await get(pool, "/")
    finally:
        pool.close()


async def test_header_section_that_never_ends_is_cut_off(upstream: Upstream) -> None:
    """A header that keeps coming is refused once over the limit, not buffered without end."""
    pool = H1Pool(upstream.url, 1, 1.0, max_header_bytes=4096)
    more = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.recv()
        await peer.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(100):
            await peer.send(b"z" * 1000)  # fails once the client has given up
        await more.wait()

    upstream.script(script)
    try:
        with pytest.raises(ProtocolError, match="too large"):
            await get(pool, "/")
        more.set()
    finally:
        pool.close()


async def test_max_body(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(
        steps(expect(), reply(ok(b"x" * 100))),
        steps(expect(), reply(chunked([b"y" * 60, b"y" * 60]))),
        steps(expect(), reply(b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 200), close()),
        steps(expect(), reply(ok(b"x" * 100)), expect(), reply(chunked([b"y" * 100]))),
    )
    for _ in range(3):
        with pytest.raises(BodyTooLarge):
            await get(pool, "/", max_body=99)
        assert pool.idle == 0
    assert (await get(pool, "/", max_body=100)).body == b"x" * 100
    assert (await get(pool, "/", max_body=100)).body == b"y" * 100


async def test_truncated_answer(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"1")), expect(), reply(ok(b"0123456789")[:-5]), close()))
    await get(pool, "/1")
    with pytest.raises(ConnectionFailed) as e:
        await get(pool, "/2")
    # The request surely reached the server: never repeated, even on a reused connection.
    assert type(e.value) is ConnectionFailed and e.value.reused and e.value.got_bytes and e.value.sent
    assert len(upstream.peers) == 1


async def test_slow_answer_byte_by_byte(upstream: Upstream, pool: H1Pool) -> None:
    answer = ok(b"slow but sure", b"X-A: 1")
    upstream.script(steps(expect(), reply(answer, splits=range(1, len(answer)), pause=0.0002)))
    r = await get(pool, "/")
    assert (r.body, r.reason) == (b"slow but sure", b"OK")


# --------------------------------------------------------------------------- failures, retry, cancellation


async def test_idle_race_is_retried_once_on_a_fresh_connection(upstream: Upstream, pool: H1Pool) -> None:
    # The server closes the kept-alive connection just as the second request arrives.
    upstream.script(steps(expect(), reply(ok(b"first")), expect(), close()))
    await get(pool, "/1")
    r = await get(pool, "/2")
    assert r.body == b"GET /2 "
    assert len(upstream.peers) == 2 and len(upstream.peers[0].requests) == 2


async def test_no_retry_on_a_fresh_connection(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), close()))
    with pytest.raises(ConnectionFailed) as e:
        await get(pool, "/")
    assert (e.value.reused, e.value.got_bytes, e.value.sent) == (False, False, True)
    assert len(upstream.peers) == 1


async def test_retry_happens_once_only(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"first")), expect(), close()), steps(expect(), close()))
    await get(pool, "/1")
    with pytest.raises(ConnectionFailed) as e:
        await get(pool, "/2")
    assert not e.value.reused and len(upstream.peers) == 2


async def test_timeout_mid_body_closes_the_connection(upstream: Upstream, pool: H1Pool) -> None:
    late = asyncio.Event()
    upstream.script(steps(expect(), reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"), wait(late)))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await pool.request("GET", "/slow", [])
    await within(upstream.peers[0].eof.wait())
    assert pool.idle == 0 and pool.in_use == 0
    late.set()
    assert (await get(pool, "/next")).body == b"GET /next "


async def test_a_deadline_mid_body_closes_the_connection(upstream: Upstream, pool: H1Pool) -> None:
    late = asyncio.Event()
    upstream.script(steps(expect(), reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"), wait(late)))
    with pytest.raises(TimeoutError):
        await pool.request("GET", "/slow", [], deadline=asyncio.get_running_loop().time() + 0.2)
    await within(upstream.peers[0].eof.wait())
    assert pool.idle == 0 and pool.in_use == 0
    late.set()
    assert (await get(pool, "/next")).body == b"GET /next "


async def test_a_deadline_covers_the_wait_for_a_free_connection(upstream: Upstream) -> None:
    late = asyncio.Event()
    upstream.script(steps(expect(), wait(late), reply(ok(b"done"))))
    pool = H1Pool(upstream.url, 1, 2.0)
    try:
        holder = asyncio.create_task(pool.request("GET", "/hold", []))
        await within(upstream.connected.wait())
        with pytest.raises(TimeoutError):
            await pool.request("GET", "/queued", [], deadline=asyncio.get_running_loop().time() + 0.1)
        late.set()
        assert (await within(holder)).body == b"done"
    finally:
        pool.close()


async def test_a_caller_with_a_deadline_keeps_its_place_in_the_queue(upstream: Upstream) -> None:
    """The slot a caller waited for is the one it uses: it never queues again behind later callers."""
    hold, slow = asyncio.Event(), asyncio.Event()

    async def script(peer: Peer) -> None:
        while True:
            req = await peer.recv()
            await (slow if req.target == b"/slow" else hold).wait()  # /hold until released, then the rest
            await peer.send(ok(echo(req)))

    upstream.default = script
    pool = H1Pool(upstream.url, 1, 2.0)
    try:
        holder = asyncio.create_task(pool.request("GET", "/hold", []))
        await within(upstream.connected.wait())
        first = asyncio.create_task(pool.request("GET", "/first", [],
                                                 deadline=asyncio.get_running_loop().time() + 1.0))
        await asyncio.sleep(0)  # queued before the next caller
        second = asyncio.create_task(pool.request("GET", "/slow", []))  # no deadline: waits as long as it takes
        await asyncio.sleep(0)
        hold.set()
        assert (await within(first, 1.5)).body == b"GET /first "
        slow.set()
        assert (await within(second)).body == b"GET /slow "
        await within(holder)
    finally:
        pool.close()


@pytest.fixture()
def unanswered_port() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops further SYNs, so connecting hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):  # fills the queue
            yield port


async def test_a_connect_that_hangs_ends_at_the_callers_deadline(unanswered_port: int) -> None:
    pool = H1Pool(f"http://127.0.0.1:{unanswered_port}", 2, 30.0)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):  # the caller's deadline: a late answer (504), not an unreachable server
            await within(pool.request("GET", "/", [], deadline=started + 0.2), 2.0)
        assert loop.time() - started < 1.0 and pool.in_use == 0
    finally:
        pool.close()


async def test_a_connect_that_hangs_ends_at_the_connect_timeout(unanswered_port: int) -> None:
    pool = H1Pool(f"http://127.0.0.1:{unanswered_port}", 2, 0.2)
    try:
        loop = asyncio.get_running_loop()
        with pytest.raises(ConnectionFailed, match="timed out"):
            await within(pool.request("GET", "/", [], deadline=loop.time() + 30.0), 2.0)
        assert pool.in_use == 0
    finally:
        pool.close()


async def test_cancelled_caller_closes_its_connection(upstream: Upstream, pool: H1Pool) -> None:
    late = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.recv()
        await late.wait()
        with contextlib.suppress(ConnectionError):
            await peer.send(ok(b"late answer"))  # too late: nobody may read it

    upstream.script(script)
    task = asyncio.create_task(pool.request("GET", "/a", []))
    await within(upstream.connected.wait())
    first = upstream.peers[0]
    await within(first.received.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await within(first.eof.wait())
    late.set()
    for i in range(3):
        assert (await get(pool, f"/b{i}")).body == b"GET /b%d " % i
    assert pool.in_use == 0


async def test_cancelled_while_connecting_or_waiting_for_a_slot(upstream: Upstream) -> None:
    pool = H1Pool(upstream.url, 1, 1.0)
    gate = asyncio.Event()
    upstream.script(steps(expect(), wait(gate), reply(ok(b"a")), serve))
    try:
        holder = asyncio.create_task(pool.request("GET", "/a", []))
        await within(upstream.connected.wait())
        await within(upstream.peers[0].received.wait())
        waiters = [asyncio.create_task(pool.request("GET", f"/w{i}", [])) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)  # let them queue for the one slot
        assert not any(w.done() for w in waiters) and pool.in_use == 1
        waiters[0].cancel()
        waiters[2].cancel()
        gate.set()
        assert (await within(holder)).body == b"a"
        assert (await within(waiters[1])).body == b"GET /w1 "
        assert waiters[0].cancelled() and waiters[2].cancelled()
        # No slot leaked: the one slot still serves, twice at once queued.
        results = await within(asyncio.gather(get(pool, "/x"), get(pool, "/y")))
        assert [r.body for r in results] == [b"GET /x ", b"GET /y "]
        assert pool.in_use == 0
    finally:
        pool.close()


async def test_pool_size_is_a_bound_under_concurrency(upstream: Upstream) -> None:
    active = 0
    peak = 0

    async def script(peer: Peer) -> None:
        nonlocal active, peak
        while True:
            req = await peer.recv()
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.002)  # the model server at work
            active -= 1
            await peer.send(ok(echo(req)))

    upstream.default = script
    pool = H1Pool(upstream.url, 3, 1.0)
    try:
        results = await within(asyncio.gather(*(pool.request("POST", f"/{i}", [], b"%d" % i) for i in range(30))))
        assert [r.body for r in results] == [b"POST /%d %d" % (i, i) for i in range(30)]
        assert peak == 3 and len(upstream.peers) == 3 and pool.idle == 3 and pool.in_use == 0
    finally:
        pool.close()


# --------------------------------------------------------------------------- streaming


async def test_stream_reuses_the_connection_when_read_to_the_end(upstream: Upstream, pool: H1Pool) -> None:
    s, data = await within(read_all(pool, "GET", "/a"))
    assert data == b"GET /a " and s.content_length == len(data) and s.has_body
    s, data = await within(read_all(pool, "POST", "/b", b"payload"))
    assert data == b"POST /b payload"
    assert len(upstream.peers) == 1 and pool.idle == 1


async def test_stream_without_body_or_read_to_its_length_is_reused(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(b"HTTP/1.1 204 No Content\r\n\r\n"), expect(), reply(ok(b"0123456789")),
                          expect(), reply(ok(b"last"))))
    async with pool.stream("DELETE", "/", [], None) as s:
        assert s.status == 204 and not s.has_body  # nothing to read: nothing left unread
    async with pool.stream("GET", "/", [], None) as s:
        got = b""
        while len(got) < (s.content_length or 0):
            got += await within(anext(s))
    assert got == b"0123456789"
    assert (await get(pool, "/")).body == b"last" and len(upstream.peers) == 1


async def test_stream_left_early_closes_the_connection(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"x" * 100))), steps(expect(), reply(ok(b"x" * (4 << 20)))))
    async with pool.stream("GET", "/", [], None) as s:
        pass  # nothing read
    await within(upstream.peers[0].eof.wait())
    async with pool.stream("GET", "/", [], None) as s:
        assert len(await within(anext(s))) < 4 << 20  # part read
    await within(upstream.peers[1].eof.wait())
    assert pool.idle == 0 and pool.in_use == 0
    with pytest.raises(ConnectionFailed):  # the stream is no use once its context is gone
        async for _ in s:
            pass


async def test_stream_error_inside_the_context_closes_the_connection(upstream: Upstream, pool: H1Pool) -> None:
    with pytest.raises(KeyError):
        async with pool.stream("GET", "/", [], None) as s:
            _ = [c async for c in s]
            raise KeyError("the caller's own failure")
    await within(upstream.peers[0].eof.wait())
    assert pool.idle == 0


async def test_stream_timeout_mid_body(upstream: Upstream, pool: H1Pool) -> None:
    gate = asyncio.Event()
    upstream.script(steps(expect(), reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
                          wait(gate)))
    got = b""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2), pool.stream("GET", "/", [], None) as s:
            async for chunk in s:
                got += chunk
    assert got == b"abc"
    await within(upstream.peers[0].eof.wait())
    gate.set()
    assert pool.idle == 0 and pool.in_use == 0


async def test_stream_truncated_body_raises(upstream: Upstream, pool: H1Pool) -> None:
    upstream.script(steps(expect(), reply(ok(b"0123456789")[:-4]), close()))
    with pytest.raises(ConnectionFailed) as e:
        await within(read_all(pool, "GET", "/"))
    assert e.value.got_bytes


async def body_of(*chunks: bytes, gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    for i, chunk in enumerate(chunks):
        if gate is not None and i == len(chunks) - 1:
            await gate.wait()
        yield chunk


async def test_streamed_request_body_chunked(upstream: Upstream, pool: H1Pool) -> None:
    chunks = (b"first ", b"", b"x" * 300_000, b" last")
    _, data = await within(read_all(pool, "PUT", "/up", body_of(*chunks)))
    req = upstream.peers[0].requests[0]
    assert req.header(b"transfer-encoding") == b"chunked" and req.header(b"content-length") is None
    assert req.body == b"".join(chunks) and data == b"PUT /up " + b"".join(chunks)
    assert pool.idle == 1


async def test_streamed_request_body_with_length(upstream: Upstream, pool: H1Pool) -> None:
    _, data = await within(read_all(pool, "POST", "/up", body_of(b"abc", b"defg"), content_length=7))
    req = upstream.peers[0].requests[0]
    assert req.header(b"content-length") == b"7" and req.header(b"transfer-encoding") is None
    assert data == b"POST /up abcdefg" and pool.idle == 1


@pytest.mark.parametrize(("chunks", "length"), [((b"abc",), 7), ((b"abc", b"defgh"), 7)])
async def test_streamed_request_body_of_the_wrong_length(
    upstream: Upstream, pool: H1Pool, chunks: tuple[bytes, ...], length: int
) -> None:
    with pytest.raises(RequestBodyError):
        await within(read_all(pool, "POST", "/up", body_of(*chunks), content_length=length))
    await within(upstream.peers[0].eof.wait())
    assert pool.idle == 0 and pool.in_use == 0


async def test_request_body_iterable_failure_propagates(upstream: Upstream, pool: H1Pool) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"abc"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="went away"):
        await within(read_all(pool, "POST", "/up", failing()))
    await within(upstream.peers[0].eof.wait())
    assert pool.idle == 0


async def test_early_answer_before_the_request_body_is_sent(upstream: Upstream, pool: H1Pool) -> None:
    never = asyncio.Event()
    for length in (None, 2000):
        upstream.script(steps(lambda peer: peer.recv_head(),
                              reply(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")))
        s, data = await within(read_all(pool, "POST", "/up", body_of(b"a" * 1000, b"b" * 1000, gate=never),
                                        content_length=length))
        assert (s.status, data) == (413, b"too big!")
        await within(upstream.peers[-1].eof.wait())  # its request was never complete: not reusable
        assert pool.idle == 0 and pool.in_use == 0


async def test_early_answer_while_a_large_body_is_still_buffered(upstream: Upstream, pool: H1Pool) -> None:
    gate = asyncio.Event()
    async def script(peer: Peer) -> None:
        await peer.recv_head()
        peer.stop_reading()  # and the client cannot finish writing its body
        await peer.send(ok(b"no"))
        await gate.wait()

    upstream.script(script)
    r = await within(pool.request("POST", "/up", [], b"x" * (32 << 20)))
    assert r.body == b"no"
    assert pool.idle == 0  # the answer came before the body was all written: closed, not reused
    gate.set()


async def test_full_duplex_stream(upstream: Upstream, pool: H1Pool) -> None:
    """An upstream that answers while still reading: the request body keeps going after the head."""
    async def script(peer: Peer) -> None:
        await peer.recv_head()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        req = await peer.recv()
        await peer.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(req.body), req.body))

    upstream.script(script)
    gate = asyncio.Event()
    async with pool.stream("POST", "/duplex", [], body_of(b"one ", b"two", gate=gate)) as s:
        assert s.status == 200 and s.chunked
        gate.set()
        data = b"".join([c async for c in s])
    assert data == b"one two" and pool.idle == 1


async def test_streamed_answer_flow_control(upstream: Upstream, pool: H1Pool) -> None:
    """A consumer that lags makes the client stop reading: buffering stays bounded."""
    total = 16 << 20
    payload = bytes(range(256)) * (total // 256)
    drained = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.recv()
        peer.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        peer.writer.write(payload)
        await peer.writer.drain()
        drained.set()

    upstream.script(script)
    bound = h1._HIGH_WATER + 256 * 1024  # plus at most one read
    async with pool.stream("GET", "/big", [], None) as s:
        await until(lambda: s._paused)
        assert s._buffered <= bound and not drained.is_set()
        received = 0
        peak = 0
        digest = bytearray()
        async for chunk in s:
            received += len(chunk)
            peak = max(peak, s._buffered)
            if len(digest) < 1024:
                digest += chunk[:1024]
        assert received == total and peak <= bound and digest[:1024] == payload[:1024]
    await within(drained.wait())
    assert pool.idle == 1


# --------------------------------------------------------------------------- parser level, every split


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def abort(self) -> None:
        self.closed = True

    close = abort

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    head: bool = False
    eof: bool = False  # the body ends where the connection does
    reusable: bool = True
    version: str = "1.1"
    reason: bytes = b"OK"


CASES = [
    Case("content-length", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world",
         200, b"hello world", ((b"Content-Type", b"text/plain"), (b"Content-Length", b"11"))),
    Case("chunked-trailers",
         b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n"
         b"0\r\nX-Trailer: t1\r\nX-Other: t2\r\n\r\n",
         201, b"hello world", ((b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")),
         ((b"X-Trailer", b"t1"), (b"X-Other", b"t2")), reason=b"Created"),
    Case("head", b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", 200, b"", ((b"Content-Length", b"11"),),
         head=True),
    Case("head-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 200, b"",
         ((b"Transfer-Encoding", b"chunked"),), head=True),
    Case("interim", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", ((b"Content-Length", b"2"),)),
    Case("close-delimited", b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nuntil the end", 200, b"until the end", ((b"X", b"y"),),
         eof=True, reusable=False),
    Case("no-content", b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", 204, b"", ((b"Content-Length", b"7"),),
         reason=b"No Content"),
    Case("http10", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", ((b"Content-Length", b"2"),),
         reusable=False, version="1.0"),
]


def new_conn(loop: asyncio.AbstractEventLoop, max_header_bytes: int = 65536) -> tuple[h1._Conn, FakeTransport]:
    pool = H1Pool("http://127.0.0.1:9", 1, 1.0, max_header_bytes=max_header_bytes)
    conn = h1._Conn(pool, loop)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def run_case(loop: asyncio.AbstractEventLoop, case: Case, pieces: Sequence[bytes], streaming: bool,
             ) -> tuple[h1._Conn, Any]:
    """Feed the pieces; return the connection and what its caller got (answer or exception)."""
    conn, _ = new_conn(loop)
    waiter = conn.begin(case.head, None, streaming)
    for piece in pieces:
        conn.data_received(piece)
    if case.eof:
        conn.connection_lost(None)
    if not waiter.done():
        return conn, None
    if waiter.exception() is not None:
        return conn, waiter.exception()
    result = waiter.result()
    if streaming:
        stream = result
        if stream._error is not None:
            return conn, stream._error
        if not stream._done:
            return conn, None
        body = b"".join(stream._chunks)
        return conn, (stream.status, bytes(stream.reason), list(stream.headers), body, list(stream.trailers),
                      stream.http_version)
    return conn, (result.status, result.reason, result.headers, result.body, result.trailers, result.http_version)


def expected(case: Case) -> tuple[Any, ...]:
    return (case.status, case.reason, list(case.headers), case.body, list(case.trailers), case.version)


def splits2(n: int) -> Iterator[list[int]]:
    return ([i] for i in range(1, n))


def splits3(n: int) -> Iterator[list[int]]:
    return ([i, j] for i in range(1, n) for j in range(i + 1, n))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("streaming", [False, True], ids=["request", "stream"])
async def test_every_split_gives_the_same_answer(case: Case, streaming: bool) -> None:
    loop = asyncio.get_running_loop()
    want = expected(case)
    n = len(case.data)
    cuts = itertools.chain([[]], splits2(n), splits3(n) if n <= 130 else (), [list(range(1, n))])
    for points in cuts:
        conn, got = run_case(loop, case, cut(case.data, points), streaming)
        assert got == want, (case.name, points)
        assert (conn.state == h1._DONE and conn.keep_alive) == case.reusable, (case.name, points)


@pytest.mark.parametrize("case", [c for c in CASES if not c.eof], ids=[c.name for c in CASES if not c.eof])
async def test_extra_bytes_at_every_offset_never_reach_anyone(case: Case) -> None:
    """Whatever the reads, bytes past the answer close the connection and are never delivered."""
    loop = asyncio.get_running_loop()
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE"
    data = case.data + extra
    want = expected(case)
    for points in itertools.chain([[]], splits2(len(data))):
        conn, got = run_case(loop, case, cut(data, points), streaming=False)
        assert got == want, (case.name, points)
        assert conn.state == h1._CLOSED, (case.name, points)


async def test_malformed_at_every_offset_is_an_error_never_an_answer() -> None:
    loop = asyncio.get_running_loop()
    bad = [
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX: \x01\r\n\r\n",
    ]
    for data in bad:
        case = Case("bad", data, 0, b"")
        for points in itertools.chain([[]], splits2(len(data))):
            conn, got = run_case(loop, case, cut(data, points), streaming=False)
            assert isinstance(got, ProtocolError), (data, points, got)
            assert conn.state == h1._CLOSED


async def test_bytes_on_an_idle_connection_close_it_whitebox() -> None:
    conn, transport = new_conn(asyncio.get_running_loop())
    conn.data_received(b"\r\n")
    assert conn.state == h1._CLOSED and transport.closed


async def test_chunk_extension_flood_is_bounded() -> None:
    conn, _ = new_conn(asyncio.get_running_loop(), max_header_bytes=1024)
    waiter = conn.begin(False, None, False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;")
    for _ in range(10):
        conn.data_received(b"e" * 200)
    assert isinstance(waiter.exception(), ProtocolError) and conn.state == h1._CLOSED


async def test_too_many_interim_answers() -> None:
    conn, _ = new_conn(asyncio.get_running_loop())
    waiter = conn.begin(False, None, False)
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\n" * 20)
    assert isinstance(waiter.exception(), ProtocolError)


# --------------------------------------------------------------------------- uvloop


def test_core_behaviour_under_uvloop() -> None:
    """uvloop's transports are not asyncio's: run the scenarios that lean on them there too."""
    scenarios: list[Callable[[Upstream, H1Pool], Awaitable[None]]] = [
        test_request_bytes_on_the_wire,
        test_keep_alive_reuses_one_connection,
        test_stale_bytes_on_an_idle_connection_close_it,
        test_idle_race_is_retried_once_on_a_fresh_connection,
        test_cancelled_caller_closes_its_connection,
        test_timeout_mid_body_closes_the_connection,
        test_close_delimited_body,
        test_streamed_request_body_chunked,
        test_early_answer_before_the_request_body_is_sent,
        test_early_answer_while_a_large_body_is_still_buffered,
        test_streamed_answer_flow_control,
    ]

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        for scenario in scenarios:
            up = await Upstream().start()
            pool = H1Pool(up.url, 4, 1.0)
            try:
                await scenario(up, pool)
            finally:
                pool.close()
                await up.close()
            assert not up.errors, (scenario.__name__, up.errors)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# --------------------------------------------------------------------------- randomized property

FAULTS = ["ok", "split", "chunked", "interim", "delay", "close_after", "extra", "close_mid", "garbage",
          "bad_header", "silent_close"]
CLEAN = {"ok", "split", "chunked", "interim", "delay", "close_after", "extra"}


@dataclass(frozen=True)
class Call:
    fault: str
    stream: bool
    cancel: str | None  # None, "timeout" (a short deadline), "on_receipt" (cancelled once the upstream has it)
    timeout_ms: int


calls = st.builds(Call, st.sampled_from(FAULTS), st.booleans(),
                  st.sampled_from([None, None, None, "timeout", "on_receipt"]), st.integers(0, 12))


async def faulty_upstream(peer: Peer, plan: dict[bytes, Call], rnd: random.Random,
                          received: dict[bytes, asyncio.Event]) -> None:
    """Answer each request as its token's plan says: correctly, slowly, or wrongly."""
    while True:
        req = await peer.recv()
        token = req.header(b"x-token") or b""
        received[token].set()
        fault = plan[token].fault
        good = ok(token)
        if fault == "ok":
            await peer.send(good)
        elif fault == "split":
            await peer.send(good, sorted(rnd.sample(range(1, len(good)), 3)), 0.0005)
        elif fault == "chunked":
            await peer.send(chunked([token[:5], token[5:]], [b"X-Token: " + token]))
        elif fault == "interim":
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n" + good)
        elif fault == "delay":
            await asyncio.sleep(rnd.random() * 0.02)
            await peer.send(good)
        elif fault == "close_after":
            await peer.send(ok(token, b"Connection: close"))
            peer.close()
            return
        elif fault == "extra":  # a desynchronised server: a second, stale answer in the same write
            await peer.send(good + ok(b"stale-" + rnd.choice(list(plan))))
        elif fault == "close_mid":
            await peer.send(good[: rnd.randrange(1, len(good))])
            peer.close()
            return
        elif fault == "garbage":
            await peer.send(b"HTTP/1.1 2O0 OK\r\n\r\n" + token)
        elif fault == "bad_header":
            await peer.send(ok(token, b"X-Bad: a\x00b"))
        elif fault == "silent_close":
            peer.close()
            return


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 4),
    callers=st.lists(st.lists(calls, min_size=1, max_size=4), min_size=3, max_size=12),
    seed=st.integers(0, 2**32 - 1),
    use_uvloop=st.booleans(),
)
def test_every_answer_reaches_its_own_caller(size: int, callers: list[list[Call]], seed: int, use_uvloop: bool) -> None:
    rnd = random.Random(seed)
    plan: dict[bytes, Call] = {}
    tokens: list[list[bytes]] = []
    for c, reqs in enumerate(callers):
        tokens.append([])
        for i, call in enumerate(reqs):
            token = b"tok-%d-%d-%08x" % (c, i, rnd.getrandbits(32))
            plan[token] = call
            tokens[c].append(token)

    async def scenario() -> None:
        received = {t: asyncio.Event() for t in plan}
        up = await Upstream(lambda peer: faulty_upstream(peer, plan, rnd, received)).start()
        pool = H1Pool(up.url, size, 1.0)
        outcomes: dict[bytes, Any] = {}
        wrong: list[tuple[bytes, bytes]] = []

        async def one(token: bytes) -> None:
            call = plan[token]
            headers = [("x-token", token)]
            deadline = call.timeout_ms / 2000 if call.cancel == "timeout" else DEADLINE
            try:
                async with asyncio.timeout(deadline):
                    if call.stream:
                        async with pool.stream("GET", b"/t/" + token, headers, None) as s:
                            body = b"".join([chunk async for chunk in s])
                    else:
                        body = (await pool.request("GET", b"/t/" + token, headers)).body
            except (ConnectionFailed, TimeoutError) as e:
                outcomes[token] = e
                return
            outcomes[token] = body
            if body != token:
                wrong.append((token, body))

        async def caller(mine: list[bytes]) -> None:
            for token in mine:
                await one(token)

        async def canceller(task: asyncio.Task[None], token: bytes) -> None:
            await received[token].wait()
            for _ in range(rnd.randrange(3)):
                await asyncio.sleep(0)
            task.cancel()

        try:
            async with asyncio.timeout(20):
                tasks = [asyncio.create_task(caller(mine)) for mine in tokens]
                watchers = [asyncio.create_task(canceller(task, t)) for task, mine in zip(tasks, tokens, strict=True)
                            for t in mine if plan[t].cancel == "on_receipt"]
                await asyncio.gather(*tasks, return_exceptions=True)
                for w in watchers:
                    w.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)

                assert not wrong, f"answers delivered to the wrong caller: {wrong}"
                for token, call in plan.items():
                    if call.fault in CLEAN and call.cancel is None and token in outcomes:
                        assert outcomes[token] == token, (call, outcomes[token])
                assert pool.in_use == 0
                for conn in pool._idle:
                    transport = conn.transport
                    assert conn.state == h1._IDLE and transport is not None and not transport.is_closing()
                    assert not conn.parts and conn.stream is None
                # The pool recovers: a clean round, as wide as the pool, all answered correctly.
                fresh = [b"fresh-%d" % i for i in range(size * 2)]
                for t in fresh:
                    plan[t] = Call("ok", False, None, 0)
                    received[t] = asyncio.Event()
                answers = await asyncio.gather(*(pool.request("GET", b"/t/" + t, [("x-token", t)]) for t in fresh))
                assert [a.body for a in answers] == fresh
        finally:
            pool.close()
            await up.close()
        assert not up.errors, up.errors

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if use_uvloop else asyncio.new_event_loop) as runner:
        runner.run(scenario())
