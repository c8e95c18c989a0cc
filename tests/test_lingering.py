"""Lingering close: a client that sends a large body without ``Expect: 100-continue`` gets the sidecar's 413
(not a connection reset), with the clients people really use; the lingering read is bounded in time, silence
and bytes."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import urllib.error
import urllib.request

import aiohttp
import orjson
import pytest

from sidecar.front.h1server import Request, Responder, ServerLimits
from tests.servers import HOST
from tests.sidecar_proc import SidecarProcess
from tests.test_slow_clients import Server, connected, post
from tests.test_slow_clients import sidecar as sidecar  # the same scripted upstream and default limits

BIG = 65 << 20  # over the default limits.max_body_bytes (64 MiB)
PATH = "/v2/models/m/infer"


def test_http_client_gets_413(sidecar: SidecarProcess) -> None:
    conn = http.client.HTTPConnection(HOST, sidecar.port, timeout=60)
    try:
        conn.request("POST", PATH, body=bytes(BIG), headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 413
        assert "error" in orjson.loads(answer.read())
    finally:
        conn.close()


def test_urllib_gets_413(sidecar: SidecarProcess) -> None:
    request = urllib.request.Request(f"{sidecar.url}{PATH}", data=bytes(BIG), method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert "error" in orjson.loads(refused.value.read())


async def test_aiohttp_gets_413(sidecar: SidecarProcess) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            f"{sidecar.url}{PATH}", data=bytes(BIG), headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=60)) as answer:
        assert answer.status == 413
        assert "error" in await answer.json(content_type=None)


def test_the_connection_closes_once_the_client_stops_sending(sidecar: SidecarProcess) -> None:
    """After the 413 the sidecar half-closes: the client reads the answer and then the end of the stream."""
    with socket.create_connection((HOST, sidecar.port), timeout=30) as sock:
        sock.sendall(post(BIG) + bytes(1 << 20))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 413 ")
        assert b"Connection: close" in received
        sock.sendall(bytes(1 << 20))  # still read (and dropped): no reset while the answer is on its way
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):  # the rest of the answer, then the sidecar's end of the stream
            received += chunk


# -- the bounds, on the server alone ---------------------------------------------------------------------


async def refuse(req: Request, out: Responder) -> None:
    """A handler that answers without reading the body (as the memory budget's 503 or a 413 does)."""
    out.close_after = True
    out.send(413, [(b"Content-Type", b"application/json")], b'{"error":"too large"}')


async def _until_closed(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def test_lingering_ends_after_its_bytes() -> None:
    limits = ServerLimits(lingering_time=30.0, lingering_timeout=5.0, lingering_bytes=1 << 20)
    async with Server(limits, refuse) as server, connected(server.port) as client:
        await client.send(post(100 << 20))
        status, _ = await client.answer()
        assert status == 413

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(100):
                    await client.send(bytes(1 << 20))

        async with asyncio.timeout(10):  # well before lingering_time: the byte bound ended it
            await asyncio.gather(flood(), _until_closed(client.reader))


async def test_lingering_ends_after_silence() -> None:
    limits = ServerLimits(lingering_time=30.0, lingering_timeout=1.0)
    async with Server(limits, refuse) as server, connected(server.port) as client:
        await client.send(post(1 << 20) + bytes(1000))
        status, _ = await client.answer()
        assert status == 413
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(10):
            await _until_closed(client.reader)  # the client sends nothing more: closed after the timeout
        assert loop.time() - started < 1.0 + 0.5 + 2.0  # the timeout, a sweep, and scheduling slack
