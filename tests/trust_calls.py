"""Calls to a real Triton, directly and through a sidecar, compared answer for answer.

Shared by tests/test_trust.py (one case per class of parser differential) and its stateful fuzz. A call
is raw: HTTP bytes exactly as a caller spells them (duplicate keys, odd headers and all), or a gRPC
method and serialized message with metadata. ``same_answer`` says whether two answers are the same,
as a caller would judge: the same status, headers that carry meaning, and the same body (gRPC: the
same status, details and message).
"""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import orjson
from tritonclient.grpc import service_pb2

from tests.rawhttp import RawAnswer, exchange_raw

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
API_KEY = ("x-api-key", "k3y")  # Triton restricts inference to callers holding this header
GRPC_API_KEY = ("triton-grpc-protocol-x-api-key", "k3y")
ADMIN_KEY = ("x-admin", "adm1n")  # and the model repository
GRPC_ADMIN_KEY = ("triton-grpc-protocol-x-admin", "adm1n")
FORWARD_PATTERN = "^x-tenant"  # headers Triton turns into model parameters
TRITON_ARGS = (
    f"--http-header-forward-pattern={FORWARD_PATTERN}",
    f"--grpc-header-forward-pattern={FORWARD_PATTERN}",
    f"--http-restricted-api=inference:{API_KEY[0]}={API_KEY[1]}",
    f"--grpc-restricted-protocol=inference:{API_KEY[0]}={API_KEY[1]}",
    f"--http-restricted-api=model-repository:{ADMIN_KEY[0]}={ADMIN_KEY[1]}",
    f"--grpc-restricted-protocol=model-repository:{ADMIN_KEY[0]}={ADMIN_KEY[1]}",
)
# Answer headers that differ between two servers answering the same request, or say what the sidecar did.
_VOLATILE = (b"date", b"server", b"x-request-id", b"connection", b"keep-alive", b"content-length")


@dataclass(frozen=True)
class HttpCall:
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def raw(self) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", "Host: test", f"Content-Length: {len(self.body)}",
                 *(f"{k}: {v}" for k, v in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(frozen=True)
class GrpcCall:
    message: bytes
    metadata: tuple[tuple[str, str], ...] = ()
    timeout: float = 30.0
    method: str = MODEL_INFER


@dataclass
class GrpcResult:
    code: grpc.StatusCode
    details: str
    message: bytes = b""

    def parsed(self) -> object:
        return service_pb2.ModelInferResponse.FromString(self.message) if self.message else None


@dataclass
class Compared:
    ok: bool
    why: str = ""
    got: object = field(default=None, repr=False)
    want: object = field(default=None, repr=False)


def send_http(port: int, call: HttpCall) -> RawAnswer:
    return exchange_raw(port, call.raw(), timeout=60)


def send_grpc(channel: grpc.Channel, call: GrpcCall) -> GrpcResult:
    rpc = channel.unary_unary(call.method)
    try:
        message = rpc(call.message, metadata=call.metadata or None, timeout=call.timeout)
    except grpc.RpcError as e:
        return GrpcResult(e.code(), e.details() or "")
    return GrpcResult(grpc.StatusCode.OK, "", message)


def same_http(got: RawAnswer, want: RawAnswer) -> Compared:
    def meaningful(a: RawAnswer) -> list[tuple[bytes, bytes]]:
        return sorted((k.lower(), v) for k, v in a.headers
                      if k.lower() not in _VOLATILE and not k.lower().startswith(b"x-sidecar-"))

    if got.status != want.status:
        return Compared(False, f"status {got.status} != {want.status}: {got.body[:200]!r} vs {want.body[:200]!r}")
    if got.body != want.body:
        return Compared(False, f"body {got.body[:300]!r} != {want.body[:300]!r}")
    if meaningful(got) != meaningful(want):
        return Compared(False, f"headers {meaningful(got)} != {meaningful(want)}")
    return Compared(True)


def same_grpc(got: GrpcResult, want: GrpcResult) -> Compared:
    if got.code != want.code or got.details != want.details:
        return Compared(False, f"status {got.code} {got.details!r} != {want.code} {want.details!r}")
    if got.parsed() != want.parsed():
        return Compared(False, f"message {got.parsed()} != {want.parsed()}")
    return Compared(True)


# -- building calls ---------------------------------------------------------------------------------------


def tensor_json(name: str, datatype: str, shape: Sequence[int], data_text: str) -> str:
    """A tensor object with its data spelt as given (the spelling is what the tests vary)."""
    return (f'{{"name":{json.dumps(name)},"datatype":"{datatype}","shape":{json.dumps(list(shape))},'
            f'"data":[{data_text}]}}')


def fp32_text(values: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def http_infer(model: str, doc_text: str, headers: Sequence[tuple[str, str]] = (), *, key: bool = True,
               encoding: str | None = None) -> HttpCall:
    body = doc_text.encode()
    hdrs = list(headers)
    if encoding is not None:
        body = gzip.compress(body, mtime=0)
        hdrs.append(("Content-Encoding", encoding))
    if key:
        hdrs.append(API_KEY)
    return HttpCall(f"/v2/models/{model}/infer", body, tuple(hdrs))


def http_binary(model: str, tensors: Sequence[tuple[str, str, Sequence[int], bytes]],
                params: dict[str, object] | None = None, outputs: Sequence[str] = (),
                headers: Sequence[tuple[str, str]] = (), key: bool = True) -> HttpCall:
    """A call with every input in Triton's binary extension: the exact bits, no parser in the way."""
    doc: dict[str, object] = {"inputs": [{"name": n, "datatype": d, "shape": list(s),
                                          "parameters": {"binary_data_size": len(b)}} for n, d, s, b in tensors]}
    if params:
        doc["parameters"] = params
    if outputs:
        doc["outputs"] = [{"name": o} for o in outputs]
    head = orjson.dumps(doc)
    hdrs = [("Inference-Header-Content-Length", str(len(head))), *headers]
    if key:
        hdrs.append(API_KEY)
    return HttpCall(f"/v2/models/{model}/infer", head + b"".join(t[3] for t in tensors), tuple(hdrs))


def fp32_bytes(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def grpc_infer(model: str, inputs: Sequence[tuple[str, str, Sequence[int], bytes]],
               params: dict[str, tuple[str, object]] | None = None, outputs: Sequence[str] = (),
               metadata: Sequence[tuple[str, str]] = (), key: bool = True, rid: str = "",
               timeout: float = 30.0) -> GrpcCall:
    """A ModelInfer with raw contents; ``params`` maps a key to (oneof field, value)."""
    msg = service_pb2.ModelInferRequest(model_name=model, id=rid)
    for name, datatype, shape, data in inputs:
        msg.inputs.add(name=name, datatype=datatype, shape=list(shape))
        msg.raw_input_contents.append(data)
    for key_name, (kind, value) in (params or {}).items():
        setattr(msg.parameters[key_name], kind, value)
    for o in outputs:
        msg.outputs.add(name=o)
    md = [*metadata, *([GRPC_API_KEY] if key else [])]
    return GrpcCall(msg.SerializeToString(), tuple(md), timeout)
