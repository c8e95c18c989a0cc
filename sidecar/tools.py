"""The offline commands: ``sidecar plan`` and ``sidecar export-warmup``.

Both read the traffic store the running sidecars write; both ask the model server for
metadata when it is reachable and go on without it when it is not.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from .config import Config
from .control.monitor import detect_protocol
from .control.plane import store_limits
from .control.warmer import Warmer
from .errors import SidecarError
from .metrics import Metrics
from .protocols.request import InferenceRequest, Protocol
from .protocols.tftensor import dtype_name
from .state import StateMachine
from .upstream.http import HttpUpstream
from .warmup.export import Signature
from .warmup.planner import batch_text
from .warmup.store import open_store


@contextlib.asynccontextmanager
async def _warmer(cfg: Config) -> AsyncIterator[Warmer]:
    store = open_store(cfg.store, store_limits(cfg))
    client = HttpUpstream(cfg.upstream, Metrics(), cfg.limits.max_answer_bytes)
    try:
        yield Warmer(cfg, store, client, StateMachine(), Metrics())
    finally:
        await client.close()
        await store.close()


async def print_plan(cfg: Config) -> int:
    async with _warmer(cfg) as warmer:
        plan = await warmer.planner.build(await _upstream_protocol(cfg, warmer.client))
    print(f"store: {warmer.planner.store.describe()}; upstream: {cfg.upstream.url}")
    print(plan.render(), end="")
    for model in plan.models:
        print(f"\n{model.model}:")
        for call in model.calls:
            print(f"  {call.kind:<8} batch {batch_text(call.batch):<4} weight {call.weight:10.1f}  {call.path}  "
                  f"{call.shape}")
    return 0


async def _upstream_protocol(cfg: Config, client: HttpUpstream) -> str:
    """The configured protocol; for ``auto``, asked of the model server as the running sidecar does."""
    if cfg.upstream.protocol != "auto":
        return cfg.upstream.protocol
    try:
        return await detect_protocol(client, 5.0)
    except SidecarError:
        return "triton"


async def export_warmup(cfg: Config, fmt: str, model: str, out: str, max_batch: int | None) -> int:
    async with _warmer(cfg) as warmer:
        requests = [call.request for call in await warmer.planner.recorded(model)]
        if fmt == "triton" and max_batch is None:
            max_batch = await warmer.max_batch_of(model, Protocol.KSERVE_HTTP)
        signatures = await _tf_signatures(warmer.client, model) if fmt == "tfserving" else {}
    if not requests:
        print(f"sidecar: nothing recorded for model {model!r}", file=sys.stderr)
        return 1
    if fmt == "tfserving":
        return _write_tfserving(requests, model, signatures, Path(out))
    if max_batch is None:
        print("sidecar: cannot reach the model server for max_batch_size; pass --max-batch-size", file=sys.stderr)
        return 2
    return _write_triton(requests, max_batch, Path(out))


def _write_tfserving(requests: list[InferenceRequest], model: str, signatures: dict[str, Signature],
                     target: Path) -> int:
    from .warmup.export import to_tfserving_warmup

    if not signatures:
        print("sidecar: no model metadata from the upstream: input types are those inferred from JSON",
              file=sys.stderr)
    exported = to_tfserving_warmup(requests, model, signatures)
    for why in exported.skipped:
        print(f"sidecar: skipped {why}", file=sys.stderr)
    if not exported.written:
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(exported.data)
    print(f"wrote {exported.written} recorded request(s) of {model} to {target}")
    return 0


def _write_triton(requests: list[InferenceRequest], max_batch: int, directory: Path) -> int:
    from .warmup.export import to_triton_model_warmup

    try:
        snippet, files = to_triton_model_warmup(requests, max_batch)
    except ValueError as e:
        print(f"sidecar: cannot export: {e}", file=sys.stderr)
        return 1
    (directory / "warmup").mkdir(parents=True, exist_ok=True)
    (directory / "model_warmup.pbtxt").write_text(snippet)
    for name, data in files.items():
        (directory / "warmup" / name).write_bytes(data)
    print(f"wrote {len(files)} input file(s) for {len(requests)} request(s): {directory}/model_warmup.pbtxt "
          f"and {directory}/warmup/; append the snippet to config.pbtxt and copy warmup/ into the model directory")
    return 0


async def _tf_signatures(client: HttpUpstream, model: str) -> dict[str, Signature]:
    """Input types per signature from TF Serving's ``GET /v1/models/{m}/metadata``; {} when unavailable."""
    try:
        status, body = await client.probe(f"/v1/models/{model}/metadata", 5.0)
        defs = body["metadata"]["signature_def"]["signature_def"] if status == 200 else {}
        return {
            name: {alias: dtype for alias, spec in sig.get("inputs", {}).items()
                   if (dtype := dtype_name(str(spec.get("dtype", "")))) is not None}
            for name, sig in defs.items()
        }
    except (SidecarError, KeyError, TypeError, AttributeError):
        return {}


