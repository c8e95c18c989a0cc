"""What the sidecar needs to know about a model, asked of the model server once and remembered.

Triton: ``GET /v2/models/{m}/config`` gives max_batch_size (0: no batch dimension), whether the
server batches itself (dynamic or sequence batching), whether the model is decoupled, and how many
instances run it. TF Serving: ``GET /v1/models/{m}/metadata`` says whether a signature has a leading
-1 dimension; its maximum comes from configuration. Unknown (no answer) is remembered briefly only.
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
        return ModelInfo(self.tf_max_batch if tf_has_batch_dim(body) else 0)


def triton_info(config: dict[str, Any]) -> ModelInfo:
    """From Triton's model configuration JSON (unset scheduling choices are absent from it)."""
    max_batch = config.get("max_batch_size")
    groups = config.get("instance_group") or []
    instances = sum(int(g.get("count", 1)) for g in groups if isinstance(g, dict)) or 1
    policy = config.get("model_transaction_policy") or {}
    return ModelInfo(
        max_batch=int(max_batch) if isinstance(max_batch, int) else None,
        server_batching=bool(config.get("dynamic_batching") is not None or config.get("sequence_batching")
                             is not None),
        decoupled=bool(isinstance(policy, dict) and policy.get("decoupled")),
        instances=instances,
    )


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


def _family(protocol: Protocol) -> Protocol:
    return Protocol.TFSERVING_REST if protocol.value.startswith("tfserving") else Protocol.KSERVE_HTTP
