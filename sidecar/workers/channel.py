"""Messages between the control process and a worker: pickled tuples, length-prefixed, on a socketpair.

Both ends are processes of one pod started by the same program, so pickle is safe here (nothing else can
write to the socket). A message is ``(kind, *fields)``; see ``pool.py`` and ``worker.py`` for the kinds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import socket
import struct
from typing import Any

from ..calls import Call, Reply
from ..errors import DecodeError, UpstreamUnavailable

_LENGTH = struct.Struct("<I")
MAX_MESSAGE = 256 * 1024 * 1024  # a replayed call and its answer are bounded by limits.max_body/answer_bytes


def encode(*message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class ChannelClosed(Exception):
    """The other end is gone."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def __repr__(self) -> str:
        return f"<Channel closing={self.writer.is_closing()}>"

    def send(self, *message: Any) -> None:
        """Queue one message (never waits: the caller bounds what it sends, see ``drain``)."""
        self.send_encoded(encode(*message))

    def send_encoded(self, frame: bytes) -> None:
        """Queue a message ``encode`` made (one snapshot pickled once for every worker)."""
        if self.writer.is_closing():
            raise ChannelClosed("channel closed")
        self.writer.write(frame)

    @property
    def pending(self) -> int:
        """Bytes queued and not yet taken by the other end."""
        transport = self.writer.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as e:
            raise ChannelClosed(str(e)) from None

    async def receive(self) -> tuple[Any, ...]:
        try:
            (n,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
            if n > MAX_MESSAGE:
                raise ChannelClosed(f"message of {n} bytes")
            message: tuple[Any, ...] = pickle.loads(await self.reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise ChannelClosed(str(e)) from None
        return message

    def close(self) -> None:
        self.writer.close()


def call_out(call: Call, now: float) -> Call:
    """A call as it crosses: its deadline as seconds left (each process has its own loop clock), without the
    front's memo (it belongs to one process's front)."""
    return dataclasses.replace(call, deadline=call.deadline - now, memo=None)


def call_in(call: Call, now: float) -> Call:
    call.deadline = now + call.deadline
    return call


def reply_out(reply: Reply | None) -> tuple[Any, ...] | None:
    """A reply as it crosses: status, the server's own answer, the canonical response where there is one."""
    if reply is None:
        return None
    response = None
    if reply.ok:
        try:
            response = reply.response()
        except (DecodeError, ValueError):
            response = None
    return (reply.status, reply.wire, response, reply.source, reply.cache)


def reply_in(packed: tuple[Any, ...] | None, call: Call) -> Reply | None:
    if packed is None:
        return None
    status, wire, response, source, cache = packed
    return Reply(status, wire=wire, for_call=call, response=response, source=source, cache=cache)


def error_out(error: BaseException) -> BaseException:
    """An exception as it crosses: itself where it pickles, else the error the sidecar maps to 502."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return UpstreamUnavailable(f"{type(error).__name__} in a worker")
    return error
