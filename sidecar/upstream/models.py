"""What the sidecar needs to know about a model, asked of the model server once and remembered.

Triton: ``GET /v2/models/{m}/config`` gives max_batch_size (0: no batch dimension), whether the
server batches itself (dynamic or sequence batching), whether the model keeps state across calls
(sequence batching), whether the model is decoupled, how many instances run it, and whether an
output has a variable (-1) non-batch dimension. TF Serving: ``GET /v1/models/{m}/metadata`` says
whether a signature has a leading -1 dimension and whether an output's other dimensions are
variable; its maximum comes from configuration. Unknown (no answer) is remembered briefly only.

A variable non-batch output dimension matters to the batcher: such a dimension may depend on the
whole batch (padding to the longest row), so one caller's answer could take its shape from another's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ..errors import SidecarError
from ..protocols.request import Protocol
from .http import HttpUpstream

log = logging.getLogger("sidecar.models")

_UNKNOWN_FOR = 5.0  # seconds an unanswered question is not asked again


@dataclass(frozen=True, slots=True)
class ModelInfo:
    max_batch: int | None  # None: unknown; 0: no batch dimension
    server_batching: bool = False
    decoupled: bool = False
    instances: int = 1
    # Some output has a variable (-1) dimension besides the batch dimension (or an unknown rank).
    variable_outputs: bool = False
    # Triton's sequence batcher: calls of one sequence share state in the server, in order.
    sequence_batching: bool = False
    # max_batch is the server's own statement (Triton's configuration), not the sidecar's setting: its 0
    # means the model has no batch dimension at all.
    authoritative: bool = False


UNKNOWN = ModelInfo(None)


class ModelCatalog:
    def __init__(self, upstream: HttpUpstream, tf_max_batch: int) -> None:
        self.upstream = upstream
        self.tf_max_batch = tf_max_batch
        self._known: dict[tuple[str, Protocol], tuple[ModelInfo, float]] = {}

    def __repr__(self) -> str:
        return f"<ModelCatalog {len(self._known)} models>"

    def cached(self, model: str, protocol: Protocol) -> ModelInfo | None:
        found = self._known.get((model, _family(protocol)))
        if found is None or (found[0] is UNKNOWN and time.monotonic() > found[1]):
            return None
        return found[0]

    async def info(self, model: str, protocol: Protocol) -> ModelInfo:
        family = _family(protocol)
        cached = self.cached(model, family)
        if cached is not None:
            return cached
        try:
            info = await (self._tfserving(model) if family is Protocol.TFSERVING_REST else self._triton(model))
        except (SidecarError, ValueError, TypeError, KeyError) as e:
            log.info("no configuration for model %s (%s)", model, getattr(e, "message", type(e).__name__))
            info = UNKNOWN
        self._known[(model, family)] = (info, time.monotonic() + _UNKNOWN_FOR)
        return info

    def forget(self, model: str | None = None) -> None:
        """A model reloaded (or the server restarted): ask again next time."""
        for key in [k for k in self._known if model is None or k[0] == model]:
            del self._known[key]

    async def _triton(self, model: str) -> ModelInfo:
        status, body = await self.upstream.probe(f"/v2/models/{model}/config", 5.0)
        if status != 200 or not isinstance(body, dict):
            return UNKNOWN
        return triton_info(body)

    async def _tfserving(self, model: str) -> ModelInfo:
        status, body = await self.upstream.probe(f"/v1/models/{model}/metadata", 5.0)
        if status != 200:
            return UNKNOWN
        return ModelInfo(self.tf_max_batch if tf_has_batch_dim(body) else 0,
                         variable_outputs=tf_variable_outputs(body))


def triton_info(config: dict[str, Any]) -> ModelInfo:
    """From Triton's model configuration JSON (unset scheduling choices are absent from it)."""
    max_batch = config.get("max_batch_size")
    groups = config.get("instance_group") or []
    instances = sum(int(g.get("count", 1)) for g in groups if isinstance(g, dict)) or 1
    policy = config.get("model_transaction_policy") or {}
    sequence = config.get("sequence_batching") is not None
    return ModelInfo(
        max_batch=int(max_batch) if isinstance(max_batch, int) else None,
        server_batching=bool(config.get("dynamic_batching") is not None or sequence),
        decoupled=bool(isinstance(policy, dict) and policy.get("decoupled")),
        instances=instances,
        variable_outputs=triton_variable_outputs(config),
        sequence_batching=sequence,
        authoritative=isinstance(max_batch, int),
    )


def triton_variable_outputs(config: dict[str, Any]) -> bool:
    """Does some output have a variable (-1) dimension besides the batch dimension? Triton's ``dims`` leave
    the batch dimension out (when max_batch_size > 0); a ``reshape`` (the model's side of ``dims``) is read
    too. Anything unreadable counts as variable: the batcher then trusts only what it checks."""
    outputs = config.get("output")
    if outputs is None:
        return False
    if not isinstance(outputs, list):
        return True
    for output in outputs:
        if not isinstance(output, dict):
            return True
        reshape = output.get("reshape")
        shapes = [output.get("dims")]
        if isinstance(reshape, dict):
            shapes.append(reshape.get("shape"))
        for dims in shapes:
            if dims is None:
                continue
            try:
                if not isinstance(dims, list) or any(int(d) < 0 for d in dims):
                    return True
            except (TypeError, ValueError):
                return True
    return False


def tf_has_batch_dim(body: object) -> bool:
    """TF Serving metadata: does some input of some signature have a leading -1 dimension?"""
    try:
        signatures = body["metadata"]["signature_def"]["signature_def"]  # type: ignore[index]
        for sig in signatures.values():
            for tensor in sig.get("inputs", {}).values():
                dims = tensor.get("tensor_shape", {}).get("dim", [])
                if dims and str(dims[0].get("size")) == "-1":
                    return True
    except (KeyError, TypeError, AttributeError):
        return False
    return False


def tf_variable_outputs(body: object) -> bool:
    """TF Serving metadata: does some output of some signature have an unknown rank or a -1 dimension after
    its first? Anything unreadable counts as variable."""
    try:
        signatures = body["metadata"]["signature_def"]["signature_def"]  # type: ignore[index]
        for sig in signatures.values():
            for tensor in (sig.get("outputs") or {}).values():
                shape = tensor.get("tensor_shape") or {}
                if shape.get("unknown_rank"):
                    return True
                if any(str(d.get("size")) == "-1" for d in (shape.get("dim") or [])[1:]):
                    return True
    except (KeyError, TypeError, AttributeError):
        return True
    return False


def _family(protocol: Protocol) -> Protocol:
    return Protocol.TFSERVING_REST if protocol.value.startswith("tfserving") else Protocol.KSERVE_HTTP
