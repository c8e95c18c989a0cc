"""What a model answers, as a digest: the part of its identity that no configuration shows.

Replaced model files under the same version (a server restarted on new files, a repository polled
and reloaded in place) change no version number and, often, no configuration; they change answers.
So the fleet agrees on one probe request per model (the first cacheable call any replica saw, kept in
Redis), each replica asks its own model server that request once per server incarnation, and the
digest of the answer becomes part of the shared tier's key for that model: replicas whose models
answer alike share answers, a replica whose model answers otherwise shares with none of them. Until a
model's digest is known, its calls skip the shared tier (never the in-process one, which only ever
holds this server's answers). Every ``cache.verify_interval`` seconds the digest is asked again: a
model reloaded in place with other answers loses its cached answers here at once.

Only deterministic models are cached at all (``cache.models`` is the operator's statement), so the
same request gives the same answer on every replica of one model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..protocols import dispatch
from ..protocols.request import InferenceRequest, InferenceResponse
from .redis import RedisTier

log = logging.getLogger("sidecar.cache")

# Asks the model server a request, with the restriction key of the caller that prompted it (None: no
# answer worth a digest - an error, the server down).
Ask = Callable[[InferenceRequest, tuple[tuple[bytes, bytes], ...]], Awaitable[InferenceResponse | None]]
_PROBE_TTL = 30 * 86400.0


@dataclass
class _Model:
    probe: InferenceRequest | None = None
    digest: str | None = None
    checked_at: float = 0.0
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    # What waits for the digest (answers to write to the shared tier); bounded, dropped on a restart.
    waiting: list[Callable[[str], None]] = field(default_factory=list, repr=False)


_MAX_WAITING = 64


class Fingerprints:
    def __init__(self, shared: RedisTier | None, ask: Ask, on_changed: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.shared = shared
        self.ask = ask
        self.on_changed = on_changed
        self.clock = clock
        self.models: dict[str, _Model] = {}

    def __repr__(self) -> str:
        known = sum(1 for m in self.models.values() if m.digest)
        return f"<Fingerprints {known}/{len(self.models)} known>"

    def current(self, model: str) -> str | None:
        found = self.models.get(model)
        return found.digest if found is not None else None

    def observe(self, request: InferenceRequest, response: InferenceResponse,
                key: tuple[tuple[bytes, bytes], ...], then: Callable[[str], None] | None = None) -> None:
        """A cacheable call of a model whose digest is not known was answered: the answer is the digest when
        the call is the probe (no Redis: this replica's first call is; with Redis: when the fleet agrees on
        this very call), else the fleet's probe is asked, in the background. ``then(digest)`` runs once the
        digest is known (not at all if the server restarts first)."""
        entry = self.models.setdefault(request.model, _Model())
        if entry.digest is not None:
            if then is not None:
                then(entry.digest)
            return
        if then is not None and len(entry.waiting) < _MAX_WAITING:
            entry.waiting.append(then)
        if entry.task is None or entry.task.done():
            entry.task = asyncio.get_running_loop().create_task(self._find(request, response, key))

    def forget(self) -> None:
        """The model server restarted: its models may answer otherwise now."""
        for entry in self.models.values():
            if entry.task is not None:
                entry.task.cancel()
            entry.digest, entry.task, entry.waiting = None, None, []

    async def adopt(self) -> None:
        """Find out now what each model the fleet has a probe for answers here, so that this replica shares
        the fleet's answers from its first call of it (run as the server comes up, and now and then)."""
        if self.shared is None:
            return
        for name, payload in (await self.shared.agreed()).items():
            _family, _, model = name.partition(":")
            entry = self.models.setdefault(model, _Model())
            if entry.digest is not None or (entry.task is not None and not entry.task.done()):
                continue
            try:
                probe = _request_of(payload)
            except Exception:  # damaged, or of another version of the sidecar
                continue
            answer = await self._digest(probe, ())
            if answer is not None:
                entry.probe, entry.digest, entry.checked_at = probe, answer, self.clock()
                waiting, entry.waiting = entry.waiting, []
                for then in waiting:
                    then(answer)

    def report(self) -> dict[str, str]:
        return {name: entry.digest for name, entry in sorted(self.models.items()) if entry.digest}

    async def verify(self, interval: float) -> None:
        """Ask each known model again once ``interval`` seconds have passed since it was last asked."""
        now = self.clock()
        for name, entry in list(self.models.items()):
            if entry.digest is None or entry.probe is None or now - entry.checked_at < interval:
                continue
            digest = await self._digest(entry.probe, ())
            entry.checked_at = self.clock()
            if digest is not None and digest != entry.digest:
                log.warning("model %s answers otherwise than before (reloaded in place?): its cached answers "
                            "are dropped", name)
                entry.digest = digest
                self.on_changed(name)

    async def _find(self, request: InferenceRequest, response: InferenceResponse,
                    key: tuple[tuple[bytes, bytes], ...]) -> None:
        entry = self.models[request.model]
        probe = entry.probe or await self._fleet_probe(request)
        if probe is None:
            return
        answer = digest(response) if _same_call(probe, request) else await self._digest(probe, key)
        if answer is not None:
            entry.probe, entry.digest, entry.checked_at = probe, answer, self.clock()
            waiting, entry.waiting = entry.waiting, []
            for then in waiting:
                then(answer)

    async def _fleet_probe(self, request: InferenceRequest) -> InferenceRequest | None:
        """The request every replica asks: the fleet's (Redis), else this one."""
        if self.shared is None:
            return request
        family = "kserve" if request.protocol.value.startswith("kserve") else "tfserving"
        agreed = await self.shared.agree(f"{family}:{request.model}", _payload(request), _PROBE_TTL)
        if agreed is None:
            return None
        try:
            return _request_of(agreed)
        except Exception:  # damaged, or of another version of the sidecar: no digest, nothing shared
            return None

    async def _digest(self, probe: InferenceRequest, key: tuple[tuple[bytes, bytes], ...]) -> str | None:
        try:
            response = await self.ask(probe, key)
        except Exception as e:  # the server down or refusing: asked again on the next cacheable call
            log.info("no fingerprint of model %s yet (%s)", probe.model, type(e).__name__)
            return None
        return None if response is None else digest(response)


def _same_call(a: InferenceRequest, b: InferenceRequest) -> bool:
    return (a.model, a.version, a.method, a.inputs, a.outputs, a.parameters) == \
        (b.model, b.version, b.method, b.inputs, b.outputs, b.parameters)


def digest(response: InferenceResponse) -> str:
    """The outputs' names, datatypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=8)
    for t in sorted(response.outputs, key=lambda t: t.name):
        h.update(f"{len(t.name)}:{t.name}|{t.datatype}|{','.join(map(str, t.shape))}|{len(t.data)}|".encode())
        h.update(t.data)
    return h.hexdigest()


def _payload(request: InferenceRequest) -> bytes:
    """A request in its family's HTTP form: target, Inference-Header-Content-Length, body."""
    target, headers, body = dispatch.encode_http(request)
    length = next((v for k, v in headers if k.lower() == dispatch.HEADER_LENGTH), b"")
    return target + b"\n" + length + b"\n" + body


def _request_of(payload: bytes) -> InferenceRequest:
    target, length, body = payload.split(b"\n", 2)
    route = dispatch.match(target.decode())
    if route is None:
        raise ValueError("not an inference target")
    return dispatch.decode_wire(route, body, [length] if length else [], [], 1 << 26)
