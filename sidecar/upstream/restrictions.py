"""Whether the model server restricts inference to callers holding a key the sidecar was not told of.

Triton checks a restricted API's header before anything else in the handler, so a call for a model
that does not exist, without any header, is answered with the restriction (HTTP 403 naming the header,
gRPC UNAVAILABLE naming the metadata key) when there is one, and "unknown model" otherwise. Asked
each time the server comes up (its flags may have changed); until the answer is in, the cache shares
nothing (a keyless caller must never get a keyed caller's answer), see ``forwarded.Rules``.
"""

from __future__ import annotations

import logging
import os

import grpc
import grpc.aio

from ..errors import SidecarError
from ..protocols import forwarded, kserve_grpc, restrict
from ..protocols.request import InferenceRequest, Protocol
from .grpc import GrpcUpstream
from .http import HttpUpstream

log = logging.getLogger("sidecar.restrictions")

_TIMEOUT = 5.0


class RestrictionProbe:
    def __init__(self, rules: forwarded.Rules, http: HttpUpstream, grpc_upstream: GrpcUpstream | None) -> None:
        self.rules = rules
        self.http = http
        self.grpc = grpc_upstream
        self.known = False  # asked since the server last came up
        # A model name no server holds: the answer is the restriction, or "unknown model".
        self._probe_model = "__warm_sidecar_probe_" + os.urandom(6).hex()

    def __repr__(self) -> str:
        return f"<RestrictionProbe known={self.known} {self.rules!r}>"

    def forget(self) -> None:
        """The server went away: what it restricts must be asked again when it is back."""
        self.known = False

    async def run(self) -> bool:
        """Ask the server; True when what the sidecar knows changed (the caller then drops cached answers)."""
        before = (self.rules.http_learned, self.rules.grpc_learned)
        http = await self._ask_http()
        if http is None:
            return False  # no answer: ask again next time the server comes up
        grpc_key = await self._ask_grpc()
        if grpc_key is None:
            # The gRPC port does not answer (not configured here, or down): its calls fail anyway; take the
            # HTTP port's word for it, under the name Triton's gRPC front gives a key.
            grpc_key = restrict.GRPC_KEY_PREFIX + http if http else b""
        self.rules.http_learned, self.rules.grpc_learned = http, grpc_key
        self.known = True
        changed = before != (http, grpc_key)
        if changed and (http or grpc_key):
            log.warning("the model server restricts inference (HTTP header %r, gRPC key %r): cached answers are "
                        "kept apart by that key; set restricted_api so the sidecar checks it and warm-up can use it",
                        http.decode("latin-1"), grpc_key.decode("latin-1"))
        return changed

    async def _ask_http(self) -> bytes | None:
        try:
            answer = await self.http.fetch(f"/v2/models/{self._probe_model}/infer", _TIMEOUT, "POST")
        except SidecarError:
            return None
        match = forwarded.HTTP_RESTRICTED.search(answer.body) if answer.status == 403 else None
        return match.group(1).lower() if match else b""

    async def _ask_grpc(self) -> bytes | None:
        if self.grpc is None:
            return b""
        message = kserve_grpc.encode_request(InferenceRequest(Protocol.KSERVE_GRPC, self._probe_model))
        try:
            await self.grpc.unary(kserve_grpc.MODEL_INFER)(message, timeout=_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                match = forwarded.GRPC_RESTRICTED.search(e.details() or "")
                return match.group(1).encode() if match else None  # unreachable: cannot tell
            return b""
        return b""
