"""The gRPC port's answer to a call whose deadline gRPC itself has ended: nothing is sent, the handler ends as
cancelled (grpc's quiet path), never with a traceback from a send the core refuses. Scripted context: the
race (the sidecar's own timer and the core's deadline firing together) cannot be made to happen on demand
against a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.config import load
from sidecar.errors import UpstreamTimeout
from sidecar.front.grpc_rpc import Rpc, Rpcs
from sidecar.metrics import Metrics
from sidecar.planes import View


class EndedCall:
    """A servicer context whose deadline has passed: gRPC refuses anything sent on it."""

    def __init__(self, remaining: float | None, done: bool = False) -> None:
        self.remaining = remaining
        self.is_done = done
        self.sent: list[Any] = []

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float | None:
        return self.remaining

    def done(self) -> bool:
        return self.is_done

    async def send_initial_metadata(self, metadata: Any) -> None:
        raise RuntimeError('Failed "execute_batch"')  # what grpc's ExecuteBatchError says

    async def abort(self, code: Any, details: str, trailing: Any = ()) -> None:
        self.sent.append((code, details))
        raise RuntimeError("abort on an ended call")


@pytest.mark.parametrize("context", [EndedCall(0.0), EndedCall(None, done=True)], ids=["deadline", "caller left"])
async def test_an_error_for_an_ended_call_ends_it_as_cancelled(context: EndedCall) -> None:
    rpcs = Rpcs(load({}, {}, {}), None, View(), Metrics())  # type: ignore[arg-type]
    rpc = Rpc(context, "infer", 60.0, lambda: "id")
    with pytest.raises(asyncio.CancelledError):
        await rpcs.fail(context, rpc, UpstreamTimeout("model server did not answer before the call's deadline"))
    assert context.sent == []


async def test_a_send_refused_as_the_deadline_passes_ends_the_call_as_cancelled() -> None:
    context = EndedCall(5.0)  # still time when the error is answered ...

    async def refused(metadata: Any) -> None:
        context.remaining = 0.0  # ... and none left by the time the send reaches the core
        raise RuntimeError('Failed "execute_batch"')

    context.send_initial_metadata = refused  # type: ignore[method-assign]
    rpcs = Rpcs(load({}, {}, {}), None, View(), Metrics())  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await rpcs.fail(context, Rpc(context, "infer", 60.0, lambda: "id"), UpstreamTimeout("late"))
    # A send that fails while the call is still live is a real error, not hidden.
    live = EndedCall(5.0)
    with pytest.raises(RuntimeError):
        await rpcs.send_metadata(live, Rpc(live, "infer", 60.0, lambda: "id"))
