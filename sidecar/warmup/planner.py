"""The warm-up plan: what to replay, per model, in order of each model's share of traffic.

Per model: the top-N recorded calls (most frequent first), the user's seed requests, and a
shape sweep: for a model with a batch dimension, one call at every batch size the recorded
histogram shows (1, 2, 4, ... up to the model's maximum when nothing is recorded), built by
stacking rows of recorded or seed requests.

A recorded call is replayed only when its payload decodes to exactly the request its key names
and is not a call of a sequence (older sidecars recorded those too), and it is sent in its
canonical form (``dispatch.encode_http``) with the headers that reach the model, whatever bytes
are stored. The rest are dropped and counted (``Plan.skipped``). Decoding is CPU work done in a
thread; a payload checked by an earlier build (same key, same bytes) is not decoded again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import DecodeError
from ..identity import batch_size, is_stateful, shape_signature
from ..protocols import dispatch, forwarded, kserve_http, restrict, tfserving_rest
from ..protocols.request import InferenceRequest, Protocol
from ..protocols.rows import row_signature, stack
from . import payload
from .store import StoredRequest, TrafficStore

log = logging.getLogger("sidecar.planner")

JSON = "application/json"


NO_BATCH = 0  # PlannedCall.batch of a model without a batch dimension


def batch_text(batch: int) -> str:
    return "-" if batch == NO_BATCH else str(batch)


@dataclass(frozen=True, slots=True)
class PlannedCall:
    model: str
    kind: str  # "recorded" | "seed" | "sweep"
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    request: InferenceRequest
    shape: str
    batch: int
    weight: float = 0.0
    # Headers that reach the model with a recorded call (Triton's header forwarding): sent with it, and part
    # of its cache identity as they are of its callers'.
    context: forwarded.Context = ()


@dataclass
class ModelPlan:
    model: str
    share: float
    max_batch: int
    calls: list[PlannedCall] = field(default_factory=list)
    covered: float = 0.0  # share of the model's recorded traffic its recorded calls carry


@dataclass
class Plan:
    models: list[ModelPlan] = field(default_factory=list)
    # Recorded calls left out, by reason (payload.REASONS): never replayed.
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return sum(len(m.calls) for m in self.models)

    def render(self) -> str:
        """The plan as a person reads it (``sidecar plan`` and the /status page)."""
        if not self.models:
            return "warm-up plan: nothing recorded or seeded yet; warm-up has nothing to replay\n"
        lines = [f"warm-up plan: {len(self.models)} model(s), {self.total_calls} call(s) per pass"]
        for m in self.models:
            kinds = {k: sum(c.kind == k for c in m.calls) for k in ("recorded", "seed", "sweep")}
            batches = sorted({c.batch for c in m.calls if c.batch != NO_BATCH})
            sizes = f"batch sizes {batches}" if m.max_batch else "no batch dimension"
            lines.append(
                f"  {m.model}: {m.share:6.1%} of traffic, max batch {m.max_batch or '-'}; "
                f"{kinds['recorded']} recorded (covering {m.covered:.0%} of its calls), {kinds['seed']} seed, "
                f"{kinds['sweep']} sweep; {sizes}"
            )
        if any(self.skipped.values()):
            lines.append("  recorded calls never replayed: " + ", ".join(
                f"{n} {_SKIPPED[reason]}" for reason, n in sorted(self.skipped.items()) if n))
        return "\n".join(lines) + "\n"


_SKIPPED = {payload.STATEFUL: "of a sequence", payload.MISMATCH: "not the call their key names",
            payload.UNREADABLE: "unreadable", payload.CREDENTIAL: "with credentials"}
# A payload's identity for the memo of checked payloads: its key, and its bytes' digest.
_Checked = tuple[str, bytes]


ModelInfo = Callable[[str, Protocol], Awaitable[int | None]]  # max batch size; 0 = none; None = unknown


class Planner:
    def __init__(self, cfg: Config, store: TrafficStore, max_batch_of: ModelInfo) -> None:
        self.cfg = cfg
        self.store = store
        self.max_batch_of = max_batch_of
        self.secrets = payload.CREDENTIALS | secret_headers(cfg)
        # Per model, the payloads the last build checked: the planned call, or why it is left out. Replaced
        # by each build of that model, so it holds no more than one plan does.
        self._checked: dict[str, dict[_Checked, PlannedCall | str]] = {}

    async def build(self, upstream: str) -> Plan:
        """``upstream``: ``triton`` or ``tfserving``, the wire format of seed files and model metadata."""
        protocol = Protocol.TFSERVING_REST if upstream == "tfserving" else Protocol.KSERVE_HTTP
        seeds = load_seeds(self.cfg.warmup.seeds, self.cfg.warmup.savedmodel, protocol)
        weights = dict(await self.store.models())
        for model in seeds:
            weights.setdefault(model, 0.0)
        total = sum(weights.values()) or 1.0
        plan = Plan()
        for model, weight in sorted(weights.items(), key=lambda kv: -kv[1]):
            model_plan = await self._model_plan(model, weight, weight / total, seeds.get(model, []), protocol,
                                                plan.skipped)
            if model_plan.calls:
                plan.models.append(model_plan)
        return plan

    async def _model_plan(self, model: str, weight: float, share: float, seeds: list[PlannedCall],
                          protocol: Protocol, skipped: dict[str, int]) -> ModelPlan:
        recorded = covering(await self.recorded(model, skipped), weight, self.cfg.record.coverage)
        base = recorded + seeds
        max_batch = await self.max_batch_of(model, protocol) or 0
        if max_batch == 0:
            # No batch dimension (or none known): a leading dimension is part of the shape, not a batch size.
            base = [dataclasses.replace(c, batch=NO_BATCH) for c in base]
        covered = min(1.0, sum(c.weight for c in recorded) / weight) if weight > 0 else 0.0
        plan = ModelPlan(model, share, max_batch, base, covered)
        if max_batch > 0 and base:
            histogram = {batch for _shape, batch, _w in await self.store.shapes(model)}
            plan.calls.extend(sweep(base, histogram, min(max_batch, self.cfg.warmup.max_batch)))
        return plan

    async def recorded(self, model: str, skipped: dict[str, int] | None = None) -> list[PlannedCall]:
        """The top ``record.top_n`` recorded calls of ``model`` that may be replayed, most frequent first;
        the others counted in ``skipped`` by reason."""
        stored = await self.store.top(model, self.cfg.record.top_n)
        if not stored:
            self._checked.pop(model, None)
            return []
        previous = self._checked.get(model, {})
        results, checked, fresh = await asyncio.to_thread(_check_all, stored, previous, self.secrets)
        self._checked[model] = checked
        calls = []
        counts: dict[str, int] = {}
        for item, result in zip(stored, results, strict=True):
            if isinstance(result, str):
                counts[result] = counts.get(result, 0) + 1
            else:
                calls.append(dataclasses.replace(result, weight=item.weight))
        for reason, n in counts.items():
            if skipped is not None:
                skipped[reason] = skipped.get(reason, 0) + n
        if fresh:  # once per payload, not at every build (the status page builds every few seconds)
            log.warning("%d recorded call(s) of %s are never replayed: %s", sum(fresh.values()), model,
                        ", ".join(f"{n} {_SKIPPED[reason]}" for reason, n in sorted(fresh.items())))
        return calls


def covering(calls: list[PlannedCall], total: float, coverage: float) -> list[PlannedCall]:
    """The most frequent ``calls`` (they come heaviest first) until together they carry ``coverage`` of the
    model's ``total`` recorded weight; all of them when they carry less."""
    chosen: list[PlannedCall] = []
    carried = 0.0
    for call in calls:
        if total > 0 and carried >= coverage * total:
            break
        chosen.append(call)
        carried += call.weight
    return chosen


def _check_all(stored: list[StoredRequest], previous: dict[_Checked, PlannedCall | str], secrets: frozenset[bytes]
               ) -> tuple[list[PlannedCall | str], dict[_Checked, PlannedCall | str], dict[str, int]]:
    """In a thread: each stored payload's planned call (weight 0) or the reason it is left out; the memo for
    the next build; the reasons found among payloads not checked before."""
    results: list[PlannedCall | str] = []
    checked: dict[_Checked, PlannedCall | str] = {}
    fresh: dict[str, int] = {}
    for item in stored:
        ident = (item.key, hashlib.blake2b(item.payload, digest_size=16).digest())
        result = checked.get(ident) or previous.get(ident)
        if result is None:
            result = _check_one(item, secrets)
            if isinstance(result, str):
                fresh[result] = fresh.get(result, 0) + 1
        checked[ident] = result
        results.append(result)
    return results, checked, fresh


def _check_one(item: StoredRequest, secrets: frozenset[bytes]) -> PlannedCall | str:
    try:
        recorded = payload.decode(item.payload)
        request = payload.check(recorded, item.key, secrets)
        # Sent as the codec read it, never as stored: what a payload of an older version holds are a caller's
        # bytes, and only their reading by the codec is known to be what the key names.
        target, headers, body = dispatch.encode_http(request)
    except payload.Unreplayable as e:
        return e.reason
    except Exception:  # stored bytes are not trusted (a Redis store is shared): one must never stop a warm-up
        return payload.UNREADABLE
    return PlannedCall(request.model, "recorded", target.decode("latin-1"),
                       tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers), body, request,
                       shape_signature(request), batch_size(request), 0.0, recorded.context_bytes())


def secret_headers(cfg: Config) -> frozenset[bytes]:
    """Header names (lower case) that hold the sidecar's configured credentials: the restricted APIs' headers,
    as HTTP headers and as Triton's gRPC metadata keys (``triton-grpc-protocol-<header>``)."""
    names: set[bytes] = set()
    for spec in (cfg.restricted_api, cfg.grpc_restricted_protocol):
        try:
            restrictions = restrict.parse(spec)
        except ValueError:
            continue  # refused when the configuration was loaded; nothing to add here
        for r in restrictions:
            names.update((r.header, b"triton-grpc-protocol-" + r.header))
    return frozenset(names)


def sweep(base: Sequence[PlannedCall], recorded_batches: Iterable[int], max_batch: int) -> list[PlannedCall]:
    """Calls at each batch size not already covered, stacked from the commonest row layout."""
    groups: dict[object, list[InferenceRequest]] = {}
    for call in base:
        signature = row_signature(call.request)
        if signature is not None:
            groups.setdefault(signature, []).append(call.request)
    if not groups:
        return []
    rows = max(groups.values(), key=len)
    wanted = sorted(b for b in set(recorded_batches) if 1 <= b <= max_batch) or powers_of_two(max_batch)
    covered = {call.batch for call in base if row_signature(call.request) == row_signature(rows[0])}
    return [planned(stack(rows, b), "sweep") for b in wanted if b not in covered]


def powers_of_two(limit: int) -> list[int]:
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    if out and out[-1] != limit:
        out.append(limit)
    return out


def planned(req: InferenceRequest, kind: str) -> PlannedCall:
    """Encode a canonical request into the wire form of its own protocol."""
    if req.protocol is Protocol.TFSERVING_REST:
        body = tfserving_rest.encode_request(req)
        path = tfserving_rest.infer_path(req)
        headers: tuple[tuple[str, str], ...] = (("Content-Type", JSON),)
    else:
        body, header_length = kserve_http.encode_request(req, True)
        path = kserve_http.infer_path(req.model, req.version)
        if header_length is None:
            headers = (("Content-Type", JSON),)
        else:
            headers = (("Content-Type", "application/octet-stream"), (kserve_http.HEADER_LENGTH, str(header_length)))
    return PlannedCall(req.model, kind, path, headers, body, req, shape_signature(req), batch_size(req))


def load_seeds(directory: str, savedmodel: str, protocol: Protocol) -> dict[str, list[PlannedCall]]:
    """Seed requests: ``<dir>/<model>/*.json`` bodies in the upstream's wire format, plus a SavedModel's
    ``assets.extra/tf_serving_warmup_requests``. A file that does not decode is reported and skipped."""
    seeds: dict[str, list[PlannedCall]] = {}
    if directory:
        for path in sorted(Path(directory).glob("*/*.json")):
            call = _seed_file(path, protocol)
            if call is not None and is_stateful(call.request):
                log.warning("seed file %s skipped: a call of a sequence is never replayed", path)
            elif call is not None:
                seeds.setdefault(call.model, []).append(call)
    if savedmodel:
        for req in _savedmodel_requests(Path(savedmodel)):
            if is_stateful(req):
                log.warning("a SavedModel warm-up record of %s skipped: a call of a sequence is never replayed",
                            req.model)
            else:
                seeds.setdefault(req.model, []).append(planned(req, "seed"))
    return seeds


def _seed_file(path: Path, protocol: Protocol) -> PlannedCall | None:
    """``<model>/<name>.json``: a KServe v2 infer body for Triton, a TF Serving body for TF Serving;
    ``<name>.classify.json`` / ``<name>.regress.json`` choose those TF Serving methods."""
    model, body = path.parent.name, path.read_bytes()
    method = next((m for m in ("classify", "regress") if path.name.endswith(f".{m}.json")), "predict")
    try:
        if protocol is Protocol.TFSERVING_REST or method != "predict":
            req = tfserving_rest.decode_request(model, "", "", method, body)
            path_ = tfserving_rest.infer_path(req)
        else:
            req = kserve_http.decode_request(model, "", body, None)
            path_ = kserve_http.infer_path(model, "")
    except DecodeError as e:
        log.warning("seed file %s skipped: %s", path, e)
        return None
    return PlannedCall(model, "seed", path_, (("Content-Type", JSON),), body, req, shape_signature(req),
                       batch_size(req))


def _savedmodel_requests(savedmodel: Path) -> list[InferenceRequest]:
    from .export import from_tfserving_warmup

    warmup_file = savedmodel / "assets.extra" / "tf_serving_warmup_requests"
    # TF Serving's layout is <base path named for the model>/<version>/; records naming no model are its.
    model = savedmodel.resolve().parent.name if savedmodel.name.isdigit() else savedmodel.resolve().name
    try:
        imported = from_tfserving_warmup(warmup_file.read_bytes(), model)
    except (OSError, ValueError) as e:
        log.warning("SavedModel warm-up file %s unreadable: %s", warmup_file, e)
        return []
    for why in imported.skipped:
        log.warning("SavedModel warm-up file %s: %s skipped", warmup_file, why)
    return imported.requests
