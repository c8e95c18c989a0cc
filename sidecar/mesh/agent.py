"""HAProxy's agent-check: a TCP port that answers each connection with one line and closes.

HAProxy (``server ... agent-check agent-port 9091 agent-inter 500ms weight 100``) connects every
``agent-inter``, reads one ASCII line up to ``\\n``, and applies its words: ``N%`` sets the weight
relative to the configured one, ``ready``/``drain``/``maint`` the administrative state,
``up``/``down`` the operational one (``down`` may carry a ``#reason`` shown on the stats page).
Only the agent can undo what it said: a server it marked down comes back only when it says
``up`` (and the regular health check passes), so every warm answer says ``up``.

    starting / loading / cold   down #<state>: <reason>
    warming                     up ready N%      N = warm-up progress in percent, at least 1
    warm                        up ready 100%
    draining                    drain

The answer is read from the state machine when the connection opens; nothing is awaited, so
a slow or silent agent client never holds anything. Whatever HAProxy sends (``agent-send``) is
read and ignored. At most ``max_connections`` are open at once (more are closed unanswered: HAProxy
marks a server down only on the agent's words, never on a missing answer), and none stays longer
than ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import cast

from ..config import split_host_port
from ..errors import ConfigError
from ..state import State, StateMachine

log = logging.getLogger("sidecar.mesh.agent")

MAX_CONNECTIONS = 64
TIMEOUT = 2.0
_REASON_CHARS = 120
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


def answer(state: State, progress: float, reason: str) -> bytes:
    """The agent line for a state, ``\\n``-terminated (HAProxy reads up to the first CR or LF)."""
    if state is State.WARM:
        return b"up ready 100%\n"
    if state is State.WARMING:
        return b"up ready %d%%\n" % max(1, min(100, round(progress * 100)))
    if state is State.DRAINING:
        return b"drain\n"
    # The description follows '#' to the end of the line: only printable ASCII may go there.
    text = _NOT_PRINTABLE.sub(" ", f"{state.value}: {reason}")[:_REASON_CHARS]
    return b"down #" + text.encode("ascii") + b"\n"


class _AgentConnection(asyncio.Protocol):
    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports behave as one
        server = self.server
        if server.open >= server.max_connections:
            transport.abort()
            return
        server.open += 1
        self.transport = transport
        m = server.machine
        transport.write(answer(m.state, m.progress, m.reason))
        # Half-close: HAProxy sees the line end and closes its side; any agent-send bytes it wrote
        # are drained below, so the close is a FIN, never a reset that could discard the line.
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(server.timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # agent-send text: this agent answers the same whoever asks

    def eof_received(self) -> bool:
        return False  # the peer is done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server.open -= 1
        if self.timer is not None:
            self.timer.cancel()


class AgentServer:
    def __init__(self, listen: str, machine: StateMachine, max_connections: int = MAX_CONNECTIONS,
                 timeout: float = TIMEOUT) -> None:
        self.listen = listen
        self.machine = machine
        self.max_connections = max_connections
        self.timeout = timeout
        self.open = 0
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<AgentServer {self.listen} open={self.open}/{self.max_connections}>"

    @property
    def port(self) -> int | None:
        """The bound port (useful with port 0), or None when not listening."""
        if self._server is None or not self._server.sockets:
            return None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _AgentConnection(self), host, port, reuse_address=True)
        except OSError as e:
            raise ConfigError(f"mesh.agent_listen {self.listen}: cannot listen ({e.strerror or e})") from None
        log.info("HAProxy agent-check on %s", self.listen)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
