"""Clients that send a request slowly, on purpose or not: a body trickled a byte at a time never stalls for
``limits.body_timeout``, so the whole request is bounded too, as Apache's mod_reqtimeout and HAProxy bound
it: a body must average ``limits.body_min_rate`` once ``limits.body_min_rate_grace`` has passed, and a whole
request may take at most ``limits.request_timeout``. Such a client gets 408 in the model server's error
shape and its connection is closed; a real upload, at full speed or merely slow, is never troubled; time the
server itself was not reading (its backpressure, an ``Expect: 100-continue`` client waiting for the go-ahead)
is not held against the client.

The server's own mechanics run in-process against a scripted raw-socket client (small limits, fast); the
whole sidecar runs as a real process with its default limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httptools
import orjson
import pytest

from sidecar.config import LimitsConfig
from sidecar.errors import SidecarError
from sidecar.front.h1server import H1Connection, H1Server, Request, Responder, ServerLimits
from tests.fake_upstream import FakeUpstream
from tests.rawhttp import RawClient
from tests.servers import HOST, free_ports
from tests.sidecar_proc import SidecarProcess

SWEEP = 0.5  # the server checks its connections' clocks this often
SLACK = 0.5  # scheduling, on a small shared machine
Handler = Callable[[Request, Responder], Awaitable[None]]


# -- the server on its own -----------------------------------------------------------------------------


async def read_body(req: Request, out: Responder) -> None:
    """What the front does with an inference body: read it whole; a SidecarError is answered in its shape."""
    try:
        body = await req.body.read(1 << 30)
    except SidecarError as e:
        out.close_after = True  # the rest of the body may still be on its way
        out.send(e.http_status, [(b"Content-Type", b"application/json")], orjson.dumps({"error": e.message}))
        return
    out.send(200, [], b"%d" % len(body))


def read_after(seconds: float) -> Handler:
    """A handler busy elsewhere (a model loading, a memory budget) before it asks for the body."""

    async def handler(req: Request, out: Responder) -> None:
        await asyncio.sleep(seconds)
        await read_body(req, out)

    return handler


class Server:
    def __init__(self, limits: ServerLimits, handler: Handler = read_body) -> None:
        self.h1 = H1Server(handler, limits)
        (self.port,) = free_ports(1)

    async def __aenter__(self) -> Server:
        await self.h1.listen(HOST, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.h1.close()


class Client:
    """A raw-socket client that sends what it is told, as slowly as it is told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def trickle(self, data: bytes, piece: int, pause: float) -> None:
        """``data`` in pieces of ``piece`` bytes, ``pause`` seconds apart; stops quietly once the server hangs up."""
        try:
            for at in range(0, len(data), piece):
                await self.send(data[at:at + piece])
                await asyncio.sleep(pause)  # the client's own pace, on purpose
        except ConnectionError:
            pass

    async def answer(self) -> tuple[int, bytes]:
        """The status and body of the next final answer (skipping 100 Continue)."""
        while True:
            collected = _Collected()
            parser = httptools.HttpResponseParser(collected)
            while not collected.done:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed before a complete answer")
                parser.feed_data(data)
            if parser.get_status_code() >= 200:
                return parser.get_status_code(), bytes(collected.body)

    async def closed_by_peer(self) -> bool:
        return await self.reader.read(65536) == b""


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[Client]:
    client = Client(*await asyncio.open_connection(HOST, port))
    try:
        yield client
    finally:
        client.writer.close()


class _Collected:
    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def post(length: int, *extra: bytes) -> bytes:
    return b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (
        length, b"".join(h + b"\r\n" for h in extra))


async def answered_while(client: Client, sending: Awaitable[None]) -> tuple[int, bytes, float]:
    """(status, body, seconds) of the answer that arrives while ``sending`` runs (or after it)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    sender = asyncio.ensure_future(sending)
    try:
        async with asyncio.timeout(30):
            status, body = await client.answer()
    finally:
        sender.cancel()
    return status, body, loop.time() - started


async def test_a_trickled_body_gets_408_once_under_the_minimum_rate() -> None:
    limits = ServerLimits(body_timeout=30.0, body_min_rate=100, body_min_rate_grace=0.5)
    async with Server(limits) as server, connected(server.port) as client:
        await client.send(post(1000))
        # A byte every 0.1 s: no stall ever reaches body_timeout, and 10 bytes/s is far under 100.
        status, body, took = await answered_while(client, client.trickle(b"x" * 1000, 1, 0.1))
        assert status == 408 and "too slow" in orjson.loads(body)["error"]
        bound = limits.body_min_rate_grace + 20 / limits.body_min_rate + SWEEP + SLACK
        assert took < bound, f"408 after {took:.2f} s; bound {bound:.2f} s"
        async with asyncio.timeout(5):
            assert await client.closed_by_peer()


async def test_a_body_slower_than_the_grace_but_over_the_minimum_rate_arrives() -> None:
    limits = ServerLimits(body_min_rate=1000, body_min_rate_grace=0.3)
    async with Server(limits) as server, connected(server.port) as client:
        await client.send(post(3000))
        # 100 bytes every 0.04 s: some 2,500 bytes/s, for over a second: several times the grace.
        status, body, took = await answered_while(client, client.trickle(b"x" * 3000, 100, 0.04))
        assert (status, body) == (200, b"3000") and took > 3 * limits.body_min_rate_grace


async def test_a_whole_request_past_the_request_timeout_gets_408() -> None:
    limits = ServerLimits(body_min_rate=0, request_timeout=0.6)
    async with Server(limits) as server, connected(server.port) as client:
        head = post(10_000)
        # Every piece in good time, 1 KB/s: only the deadline on the whole request ends it.
        status, body, took = await answered_while(client, client.trickle(head + b"x" * 10_000, 100, 0.1))
        assert status == 408 and "error" in orjson.loads(body)
        assert took < limits.request_timeout + SWEEP + SLACK


async def test_a_header_section_past_the_request_timeout_gets_408() -> None:
    limits = ServerLimits(header_timeout=30.0, request_timeout=0.6)
    async with Server(limits) as server, connected(server.port) as client:
        status, _, took = await answered_while(client, client.trickle(b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 100,
                                                                        8, 0.1))
        assert status == 408 and took < limits.request_timeout + SWEEP + SLACK


async def test_the_body_clock_starts_at_100_continue() -> None:
    """The client waits for the go-ahead; the handler gives it late: that wait is not the client's."""
    limits = ServerLimits(body_min_rate=1000, body_min_rate_grace=0.2)
    async with Server(limits, read_after(1.2)) as server, connected(server.port) as client:
        await client.send(post(500, b"Expect: 100-continue"))
        assert (await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
        status, body, _ = await answered_while(client, client.send(b"y" * 500))
        assert (status, body) == (200, b"500")


class ManualClock(H1Server):
    """The server with a clock the test moves, for the clocks' arithmetic (no sockets, no sweeps)."""

    def __init__(self, limits: ServerLimits) -> None:
        super().__init__(never_reads, limits)
        self.t = 100.0
        self._loop = asyncio.get_running_loop()

    def now(self) -> float:
        return self.t


async def never_reads(req: Request, out: Responder) -> None:
    await asyncio.Event().wait()


class QuietTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def close(self) -> None:
        pass


async def test_time_the_server_is_not_reading_is_not_the_clients() -> None:
    """A body past the server's buffer pauses reading until the handler wants it: the paused time is excused."""
    limits = ServerLimits(body_min_rate=1 << 20, body_min_rate_grace=1.0)
    server = ManualClock(limits)
    conn, transport = H1Connection(server), QuietTransport()
    conn.connection_made(transport)
    try:
        conn.data_received(post(4 << 20) + b"z" * (600 << 10))  # past the buffer's high-water mark
        assert not transport.reading  # backpressure: the client cannot send more, through no fault of its own
        server.t += 10.0
        assert not conn.too_slow(server.t)
        conn.resume_reading()  # the handler wants the body at last
        # 600 KiB were in before the pause: at 1 MiB/s that buys 0.6 s past the grace, counted from the
        # headers with the paused 10 s left out.
        server.t += limits.body_min_rate_grace + 0.5
        assert not conn.too_slow(server.t)
        server.t += 0.2
        assert conn.too_slow(server.t)
    finally:
        conn.connection_lost(None)


# -- the whole sidecar ---------------------------------------------------------------------------------

DEFAULTS = LimitsConfig()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    work = tmp_path_factory.mktemp("slow")
    with FakeUpstream() as upstream, SidecarProcess(upstream.url, work, "triton",
                                                     ["--set", "shutdown_delay=0"]) as proc:
        yield proc


def test_a_body_sent_a_byte_every_second_gets_408_by_default(sidecar: SidecarProcess) -> None:
    """The report: a body trickled in was never timed out. With the default limits it is, in the model
    server's error shape, and the connection is closed."""
    with RawClient(sidecar.port) as client:
        client.send(post(100))
        started = time.monotonic()
        client.sock.settimeout(1.0)
        answer = None
        for _ in range(int(DEFAULTS.body_min_rate_grace + SWEEP + SLACK) + 2):
            try:
                client.send(b"x")
            except OSError:
                break
            try:
                answer = client.answer()
                break
            except TimeoutError:
                continue  # no answer within the second: the next byte, at the client's pace
        took = time.monotonic() - started
        assert answer is not None and answer.status == 408
        assert answer.header(b"Content-Type") == b"application/json" and "error" in orjson.loads(answer.body)
        assert took < DEFAULTS.body_min_rate_grace + SWEEP + SLACK + 1.0
        assert took < DEFAULTS.body_timeout  # the stall timeout would never have fired
        assert client.closed_by_peer()


def test_a_large_body_at_full_speed_is_unaffected(sidecar: SidecarProcess) -> None:
    body = b"0" * (8 << 20)
    with RawClient(sidecar.port, timeout=30) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        client.send(post(len(body)) + body)
        assert client.answer().status == 200
        client.send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.answer().status == 200  # and the connection stays open for the next
