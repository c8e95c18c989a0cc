"""Differential transparency of the data port: the same call sent to the model server directly and through
the sidecar gets the same status, body and stable headers.

A corpus of several hundred calls (valid, odd and malformed), generated from fixed seeds, goes to the real
Triton (``triton`` vs ``sidecar``) and to the real KServe ModelServer standing in for TF Serving REST
(``kserve`` vs ``kserve_sidecar``). Each side keeps one keep-alive connection; every mismatch is reported
at once. Requests are written as raw bytes (the target exactly as given, never normalised), answers are
parsed by ``http.client``. Two differences are not differences: a model server that hangs up without an
answer against the sidecar's 502 for it (what HAProxy and Envoy answer), and a Content-Length that only
restates the body's length (an HTTP/1.0 answer delimited by closing is the same message).

The sidecar's one refusal of its own (``safety.check``: a JSON tensor whose shape declares far
more elements than the body holds, which aborts Triton) is kept out of the equality corpus and tested on
its own: a 400 naming the shape, and Triton still alive afterwards. The same danger hidden where the
sidecar's codec cannot see it but Triton's parser can (JSON Triton reads and orjson refuses, duplicate
keys, an Inference-Header-Content-Length Triton reads more leniently, a body that inflates past the
decoding limit) runs against a Triton of its own, so that a miss cannot take the session's Triton down.
"""

from __future__ import annotations

import gzip
import http.client
import random
import re
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from sidecar.errors import DecodeError, PayloadTooLarge, UnsafeInput
from sidecar.protocols import compression, dispatch, safety
from tests.servers import MODELS_DIR, KServeServer, TritonServer, http_status
from tests.sidecar_proc import SidecarProcess
from tests.wire import Answer

HeaderPairs = tuple[tuple[str, str], ...]
JSON_CT = (("Content-Type", "application/json"),)
INFER = "/v2/models/identity_fp32/infer"
DTYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
          "FP16", "BF16", "FP32", "FP64", "BYTES")
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64}
SEED = 20240611
# What curl --http2 sends on a plain-http URL.
H2C_UPGRADE = (("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__"))


# -- the wire -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One raw HTTP/1.1 request. ``target`` is sent exactly as given (latin-1); ``chunks`` sends the body
    chunked; otherwise a body gets a Content-Length unless ``headers`` frame it already."""

    name: str
    method: str
    target: str
    body: bytes | None = None
    headers: HeaderPairs = ()
    chunks: tuple[bytes, ...] | None = None
    version: str = "1.1"
    volatile: bool = False  # the answer may change between two calls (statistics): the pair is tried again

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/{self.version}", "Host: localhost"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        framed = any(k.lower() in ("content-length", "transfer-encoding") for k, _ in self.headers)
        payload = b""
        if self.chunks is not None:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in self.chunks if c) + b"0\r\n\r\n"
        elif self.body is not None:
            if not framed:
                lines.append(f"Content-Length: {len(self.body)}")
            payload = self.body
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload

    def whole_body(self) -> bytes:
        return b"".join(self.chunks) if self.chunks is not None else self.body or b""

    def header(self, name: str) -> str | None:
        """First value, as Triton reads it."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class KeepAlive:
    """One keep-alive connection to one server; reconnects when the server closed it."""

    def __init__(self, base: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, case: Case) -> Answer:
        for attempt in range(2):
            fresh = self.sock is None
            if self.sock is None:
                self.sock = socket.create_connection(self.address, timeout=self.timeout)
            try:
                self.sock.sendall(case.wire())
                response = http.client.HTTPResponse(self.sock, method=case.method)
                response.begin()
                body = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead) as e:
                self.close()
                if fresh or attempt:  # a fresh connection that failed is the server's answer
                    return Answer(0, [], f"<connection failed: {type(e).__name__}>".encode())
                continue  # the server closed an idle keep-alive connection: once more on a new one
            if response.will_close or case.method == "HEAD":
                self.close()  # Triton sends a body even after a HEAD: that connection cannot be reused
            return Answer(response.status, response.getheaders(), body)
        raise AssertionError("unreachable")


def differences(direct_url: str, proxied_url: str, cases: Iterable[Case]) -> tuple[list[str], Counter[int]]:
    """Every case sent to both; (one line per mismatch, the direct statuses seen)."""
    mismatches: list[str] = []
    statuses: Counter[int] = Counter()
    with KeepAlive(direct_url) as direct, KeepAlive(proxied_url) as proxied:
        for case in cases:
            a, b = direct.exchange(case), proxied.exchange(case)
            for _ in range(3 if case.volatile else 0):
                if (a.status, a.body) == (b.status, b.body):
                    break
                a, b = direct.exchange(case), proxied.exchange(case)
            statuses[a.status] += 1
            if a.status == 0 and closed_upstream(b):
                continue  # the server hung up without answering: a proxy says 502, as HAProxy and Envoy do
            if deliberately_refused(case, b):
                continue
            if (a.status, a.body) != (b.status, b.body):
                mismatches.append(f"{case.name}: direct {a.status} {a.body[:150]!r} | proxied {b.status} "
                                  f"{b.body[:150]!r}")
            elif stable(a) != stable(b) and not refused_at_the_front(b):
                # (Triton's 405 for a method it does not know says text/plain on some paths, JSON on others.)
                mismatches.append(f"{case.name}: headers direct {stable(a)} | proxied {stable(b)}")
            elif b.status and b.header("x-sidecar-state") is None and not refused_at_the_front(b):
                mismatches.append(f"{case.name}: the proxied answer did not come through the sidecar")
    return mismatches, statuses


def stable(answer: Answer) -> dict[str, str]:
    """``Answer.stable_headers``, with a Content-Length that merely restates the body's length left out: a body
    delimited by closing (HTTP/1.0) or by chunks is the same message as one with its length given."""
    headers = answer.stable_headers()
    if headers.get("content-length") == str(len(answer.body)):
        del headers["content-length"]
    return headers


def closed_upstream(answer: Answer) -> bool:
    """The sidecar's own answer for a model server that closed the connection without answering."""
    return answer.status == 502 and b"closed the connection" in answer.body and answer.body.startswith(b'{"error":')


def deliberately_refused(case: Case, proxied: Answer) -> bool:
    """The documented differences (docs/architecture.md): raw non-ASCII bytes in the target and asterisk-form
    targets other than ``OPTIONS *`` are refused with 400 at the front, as HAProxy does (Triton answers the
    first as an unknown model and hangs up on the second)."""
    if proxied.status != 400 or not proxied.body.startswith(b'{"error":"malformed HTTP request'):
        return False
    target = case.target.encode("utf-8", "surrogateescape") if isinstance(case.target, str) else case.target
    return target.startswith(b"*") or any(byte >= 0x80 for byte in target)


def refused_at_the_front(answer: Answer) -> bool:
    """An answer the HTTP parser gives before any handler runs (so before any x-sidecar-state)."""
    return answer.header("Connection") == "close" and answer.body.startswith(b'{"error":')


def refused_by_sidecar(case: Case) -> bool:
    """Whether the sidecar's own refusal (safety.check) answers this case, exactly as the sidecar decides."""
    if case.method != "POST" or dispatch.match(case.target.partition("?")[0]) is None:
        return False
    if not case.target.startswith("/v2/"):
        return False
    body = case.whole_body()
    try:
        encoding = case.header("Content-Encoding")
        if encoding is not None:
            body = compression.decompress(encoding.encode("latin-1"), body, 64 * 1024 * 1024)
        lengths = [v.encode("latin-1") for k, v in case.headers if k.lower() == "inference-header-content-length"]
        safety.check(body, lengths)
    except (UnsafeInput, PayloadTooLarge):
        return True
    except DecodeError:
        return False
    return False


# -- building blocks ----------------------------------------------------------------------------------


def js(value: Any) -> bytes:
    return orjson.dumps(value)


def tensor(name: str, datatype: str, shape: list[int], data: Any = None, **params: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        obj["data"] = data
    if params:
        obj["parameters"] = params
    return obj


def infer_case(name: str, doc: Any, model: str = "identity_fp32", headers: HeaderPairs = JSON_CT,
               target: str | None = None) -> Case:
    body = doc if isinstance(doc, bytes) else js(doc)
    return Case(name, "POST", target or f"/v2/models/{model}/infer", body, headers)


def binary_case(name: str, header: dict[str, Any], raw: bytes, model: str = "identity_fp32",
                length: str | None = None, extra: HeaderPairs = ()) -> Case:
    head = js(header)
    value = str(len(head)) if length is None else length
    headers = (("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", value), *extra)
    return Case(name, "POST", f"/v2/models/{model}/infer", head + raw, headers)


def fp32(values: list[float], shape: list[int] | None = None, **doc: Any) -> dict[str, Any]:
    return {"inputs": [tensor("INPUT0", "FP32", shape or [1, len(values)], values)], **doc}


def pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def raw_of(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        return pack_bytes([v if isinstance(v, bytes) else str(v).encode() for v in values])
    if datatype == "BF16":
        return np.array(values, dtype=np.float32).view(np.uint32).__rshift__(16).astype("<u2").tobytes()
    return np.array(values, dtype=NUMPY[datatype]).astype(np.dtype(NUMPY[datatype]).newbyteorder("<")).tobytes()


# Per datatype: values that fit, values out of range, values of the wrong JSON kind.
VALID: dict[str, list[Any]] = {
    "BOOL": [True, False, True], "UINT8": [0, 7, 255], "UINT16": [0, 9, 65535], "UINT32": [0, 1, 4294967295],
    "UINT64": [0, 1, 18446744073709551615], "INT8": [-128, 0, 127], "INT16": [-32768, 5, 32767],
    "INT32": [-2147483648, 3, 2147483647], "INT64": [-9223372036854775808, 0, 9223372036854775807],
    "FP16": [1.5, -2.0, 0.0], "BF16": [1.5, -2.0, 0.0], "FP32": [1.5, -2.25, 3.0e38],
    "FP64": [1.5, -2.25, 1.0e308], "BYTES": ["a", "héllo", ""],
}
OUT_OF_RANGE: dict[str, list[Any]] = {
    "BOOL": [2, 0, 1], "UINT8": [256, 0, 1], "UINT16": [65536, 0, 1], "UINT32": [4294967296, 0, 1],
    "UINT64": [-1, 0, 1], "INT8": [-129, 0, 1], "INT16": [32768, 0, 1], "INT32": [2147483648, 0, 1],
    "INT64": [9223372036854775808, 0, 1], "FP16": [1.0e6, 0, 1], "BF16": [1.0e39, 0, 1],
    "FP32": [1.0e39, 0, 1], "FP64": [-1.7976931348623157e308, 0, 1], "BYTES": [1, 2, 3],
}
WRONG_KIND: dict[str, list[Any]] = {dt: ["x", "y", "z"] for dt in DTYPES} | {"BYTES": [True, None, 1.5]}


# -- the Triton corpus --------------------------------------------------------------------------------


def stats_cases() -> list[Case]:
    """First in the run: statistics change with every inference, so they go before any."""
    return [Case(f"stats {m} {p}", m, p, volatile=True) for p in ("/v2/models/stats", "/v2/models/slow/stats",
                                               "/v2/models/slow/versions/1/stats", "/v2/models/nope/stats")
            for m in ("GET", "HEAD")]


def datatype_cases() -> list[Case]:
    cases: list[Case] = []
    for dt in DTYPES:
        for model in ("identity_fp32", "bytes_echo"):
            name = f"json {dt} {model}"
            cases += [
                infer_case(f"{name} valid", {"inputs": [tensor("INPUT0", dt, [1, 3], VALID[dt])]}, model),
                infer_case(f"{name} out of range", {"inputs": [tensor("INPUT0", dt, [1, 3], OUT_OF_RANGE[dt])]},
                           model),
                infer_case(f"{name} wrong kind", {"inputs": [tensor("INPUT0", dt, [1, 3], WRONG_KIND[dt])]}, model),
                infer_case(f"{name} nested rows", {"inputs": [tensor("INPUT0", dt, [3, 1],
                                                                     [[v] for v in VALID[dt]])]}, model),
                infer_case(f"{name} shape mismatch", {"inputs": [tensor("INPUT0", dt, [1, 4], VALID[dt])]}, model),
                infer_case(f"{name} empty", {"inputs": [tensor("INPUT0", dt, [1, 0], [])]}, model),
            ]
        # The binary extension: exact size, one byte short, one byte long.
        raw = raw_of(dt, VALID[dt])
        for model in ("identity_fp32", "bytes_echo"):
            header = {"inputs": [tensor("INPUT0", dt, [1, 3], binary_data_size=len(raw))]}
            cases.append(binary_case(f"binary {dt} {model} exact", header, raw, model))
            short = {"inputs": [tensor("INPUT0", dt, [1, 3], binary_data_size=len(raw) - 1)]}
            cases.append(binary_case(f"binary {dt} {model} short", short, raw[:-1], model))
            long = {"inputs": [tensor("INPUT0", dt, [1, 3], binary_data_size=len(raw) + 1)]}
            cases.append(binary_case(f"binary {dt} {model} long", long, raw + b"\0", model))
    return cases


def tritonclient_cases() -> list[Case]:
    """Bodies as tritonclient writes them, with the request and response compression it offers."""
    rng = np.random.default_rng(SEED)
    cases: list[Case] = []
    for i in range(24):
        binary_in, binary_out = bool(i & 1), bool(i & 2)
        width = int(rng.integers(1, 9))
        if i % 3 == 2:
            model, dt = "bytes_echo", "BYTES"
            values: Any = np.array([[f"s{i}-{j}-é".encode() for j in range(width)]], dtype=np.object_)
        else:
            model, dt = "identity_fp32", "FP32"
            values = rng.standard_normal((int(rng.integers(1, 4)), width)).astype(np.float32)
        inp = httpclient.InferInput("INPUT0", list(values.shape), dt)
        inp.set_data_from_numpy(values, binary_data=binary_in)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)] if i % 4 else None
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            [inp], outputs=outputs, request_id=f"tc-{i}" if i % 5 else "")
        headers: list[tuple[str, str]] = []
        if json_size is not None:
            headers.append(("Inference-Header-Content-Length", str(json_size)))
        if i % 4 == 1:
            headers.append(("Content-Encoding", "gzip"))
            body = gzip.compress(body)
        elif i % 4 == 3:
            headers.append(("Content-Encoding", "deflate"))
            body = zlib.compress(body)
        if i % 6 in (0, 1):
            headers.append(("Accept-Encoding", "gzip"))
        elif i % 6 == 2:
            headers.append(("Accept-Encoding", "deflate"))
        cases.append(Case(f"tritonclient #{i} {model} bin_in={binary_in} bin_out={binary_out}", "POST",
                          f"/v2/models/{model}/infer", body, tuple(headers)))
    return cases


def output_cases() -> list[Case]:
    two = [tensor("INPUT0", "FP32", [4], [1, 2, 3, 4]), tensor("INPUT1", "FP32", [4], [0.5, 0.5, 0.5, 0.5])]
    cases: list[Case] = []
    for binary in (None, True, False):
        for everything in (None, True, False):
            outputs = [{"name": "OUTPUT0"} | ({} if binary is None else {"parameters": {"binary_data": binary}}),
                       {"name": "OUTPUT1"}]
            params = {} if everything is None else {"parameters": {"binary_data_output": everything}}
            cases.append(infer_case(f"add_sub outputs binary={binary} binary_data_output={everything}",
                                    {"inputs": two, "outputs": outputs, **params}, "add_sub"))
    odd_outputs: list[Any] = [
        [], [{"name": "NOPE"}], [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}], [{"name": 5}], [{}], "OUTPUT0", [[]],
        [{"name": "OUTPUT0", "parameters": {"binary_data": "yes"}}],
        [{"name": "OUTPUT0", "parameters": {"classification": 2}}],
        [{"name": "OUTPUT0", "parameters": {"classification": 0}}],
        [{"name": "OUTPUT0", "parameters": {"unknown": 1}}],
        [{"name": "OUTPUT0", "parameters": 7}],
        [{"name": "OUTPUT1", "parameters": {"binary_data": True}}],
    ]
    for i, outputs in enumerate(odd_outputs):
        cases.append(infer_case(f"add_sub odd outputs #{i}", {"inputs": two, "outputs": outputs}, "add_sub"))
        cases.append(infer_case(f"identity odd outputs #{i}", fp32([1, 2], outputs=outputs)))
    cases.append(infer_case("bytes_echo binary_data_output", {
        "inputs": [tensor("INPUT0", "BYTES", [1, 2], ["a", "b"])], "parameters": {"binary_data_output": True}},
        "bytes_echo"))
    head = js({"inputs": [two[0], tensor("INPUT1", "FP32", [4], binary_data_size=16)],
               "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": True}}]})
    cases.append(Case("add_sub one input binary one json", "POST", "/v2/models/add_sub/infer",
                      head + raw_of("FP32", [1, 1, 1, 1]), (("Inference-Header-Content-Length", str(len(head))),)))
    return cases


def id_and_parameter_cases() -> list[Case]:
    ids: list[Any] = ["", "x", "héllo wörld", "a" * 4096, "quote\"back\\slash", "\u0000nul", 5, None, [], {}, True]
    params: list[Any] = [
        {}, {"sequence_id": 7, "sequence_start": True, "sequence_end": True}, {"priority": 1}, {"priority": -1},
        {"timeout": 1000000}, {"timeout": "soon"}, {"delay": 0}, {"custom": {"nested": [1, 2]}},
        {"binary_data_output": "true"}, {"sequence_id": "abc"}, [], "x", None, {"": 1}, {"a" * 300: "b" * 300},
    ]
    cases = [infer_case(f"id #{i}", fp32([1.0], id=v)) for i, v in enumerate(ids)]
    cases += [infer_case(f"parameters #{i}", fp32([2.0], parameters=v)) for i, v in enumerate(params)]
    cases += [infer_case(f"input parameters #{i}", {"inputs": [
        tensor("INPUT0", "FP32", [1, 1], [1.0]) | {"parameters": v}]}) for i, v in enumerate(params[:8])]
    return cases


def compression_cases() -> list[Case]:
    body = js(fp32([1.0, 2.0, 3.0], id="z"))
    inp = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(np.array([[1, 2]], dtype=np.float32), binary_data=True)
    bbody, blen = httpclient.InferenceServerClient.generate_request_body([inp])
    gz, zl, raw_deflate = gzip.compress(body), zlib.compress(body), zlib.compress(body)[2:-4]
    variants: list[tuple[str, bytes, str | None]] = [
        ("gzip", gz, "gzip"), ("deflate zlib", zl, "deflate"), ("deflate raw", raw_deflate, "deflate"),
        ("identity", body, "identity"), ("x-gzip", gz, "x-gzip"), ("GZIP upper", gz, "GZIP"),
        ("br", gz, "br"), ("gzip list", gz, "gzip, identity"), ("empty coding", body, ""),
        ("gzip corrupt", gz[:10] + b"\xff" * 8 + gz[18:], "gzip"), ("gzip truncated", gz[:-6], "gzip"),
        ("gzip trailing junk", gz + b"junk", "gzip"), ("gzip two members", gzip.compress(body[:9]) +
                                                         gzip.compress(body[9:]), "gzip"),
        ("deflate corrupt", zl[:4] + b"\0\0\0" + zl[7:], "deflate"), ("gzip of nothing", gzip.compress(b""), "gzip"),
        ("plain body labelled gzip", body, "gzip"), ("gzip body unlabelled", gz, None),
        ("gzip of not json", gzip.compress(b"{nope"), "gzip"),
    ]
    cases = [Case(f"compressed {n}", "POST", INFER, b, (("Content-Encoding", c),) if c is not None else ())
             for n, b, c in variants]
    for coding, pack in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        cases.append(Case(f"compressed binary {coding}", "POST", INFER, pack(bbody),
                          (("Content-Encoding", coding), ("Inference-Header-Content-Length", str(blen)))))
        cases.append(Case(f"compressed bytes_echo {coding}", "POST", "/v2/models/bytes_echo/infer",
                          pack(js({"inputs": [tensor("INPUT0", "BYTES", [1, 2], ["é", "x" * 500])]})),
                          (("Content-Encoding", coding),)))
    for accept in ("gzip", "deflate", "br", "*", "gzip;q=0", "identity", "gzip, deflate", "deflate;q=0.5, gzip",
                   "x-gzip", "GZIP", ""):
        big = js(fp32([float(i) for i in range(300)], outputs=[{"name": "OUTPUT0"}]))
        cases.append(Case(f"accept-encoding {accept!r}", "POST", INFER, big, (("Accept-Encoding", accept),)))
        cases.append(Case(f"accept-encoding {accept!r} GET config", "GET", "/v2/models/identity_fp32/config",
                          None, (("Accept-Encoding", accept),)))
    return cases


def shared_memory_cases() -> list[Case]:
    region = {"shared_memory_region": "nope", "shared_memory_byte_size": 8}
    cases = [
        infer_case("shm input unregistered", {"inputs": [tensor("INPUT0", "FP32", [1, 2], **region)]}),
        infer_case("shm input with offset", {"inputs": [tensor("INPUT0", "FP32", [1, 2], **region,
                                                                shared_memory_offset=4)]}),
        infer_case("shm input without size", {"inputs": [tensor("INPUT0", "FP32", [1, 2],
                                                                 shared_memory_region="nope")]}),
        infer_case("shm input bad size type", {"inputs": [tensor("INPUT0", "FP32", [1, 2],
                                                                  shared_memory_region="nope",
                                                                  shared_memory_byte_size="8")]}),
        infer_case("shm input and data", {"inputs": [tensor("INPUT0", "FP32", [1, 2], [1, 2], **region)]}),
        infer_case("shm output unregistered", fp32([1, 2], outputs=[{"name": "OUTPUT0", "parameters": region}])),
        infer_case("shm output with binary_data", fp32([1, 2], outputs=[
            {"name": "OUTPUT0", "parameters": region | {"binary_data": True}}])),
        infer_case("shm output region not string", fp32([1, 2], outputs=[
            {"name": "OUTPUT0", "parameters": {"shared_memory_region": 5, "shared_memory_byte_size": 8}}])),
    ]
    for kind in ("systemsharedmemory", "cudasharedmemory"):
        cases += [
            Case(f"{kind} status", "GET", f"/v2/{kind}/status"),
            Case(f"{kind} region status", "GET", f"/v2/{kind}/region/nope/status"),
            Case(f"{kind} register bad", "POST", f"/v2/{kind}/region/nope/register",
                 js({"key": "/no_such_key_for_tests", "offset": 0, "byte_size": 8}), JSON_CT),
            Case(f"{kind} register not json", "POST", f"/v2/{kind}/region/nope/register", b"{", JSON_CT),
            Case(f"{kind} unregister unknown", "POST", f"/v2/{kind}/region/nope/unregister", b""),
        ]
    return cases


def shape_cases() -> list[Case]:
    """Huge shapes with tiny bodies in the binary extension; large JSON shapes short of safety.check's range."""
    cases: list[Case] = []
    huge = ([1, 2**40], [2**31, 2**31], [2**62, 4], [2**63 - 1], [1, 2**40, 2**40], [0, 2**62], [2**40, 0])
    for i, shape in enumerate(huge):
        for dt, model, raw in (("FP32", "identity_fp32", b"\0\0\0\0"), ("BYTES", "bytes_echo", b"\1\0\0\0a"),
                               ("INT8", "identity_fp32", b"\0")):
            header = {"inputs": [tensor("INPUT0", dt, shape, binary_data_size=len(raw))]}
            cases.append(binary_case(f"binary huge shape #{i} {dt}", header, raw, model))
    cases.append(binary_case("binary_data_size huge", {"inputs": [tensor("INPUT0", "FP32", [1, 1],
                                                                         binary_data_size=2**40)]}, b"\0" * 4))
    cases.append(binary_case("binary_data_size negative", {"inputs": [tensor("INPUT0", "FP32", [1, 1],
                                                                             binary_data_size=-4)]}, b"\0" * 4))
    cases.append(binary_case("binary_data_size string", {"inputs": [tensor("INPUT0", "FP32", [1, 1],
                                                                           binary_data_size="4")]}, b"\0" * 4))
    cases.append(binary_case("binary_data_size float", {"inputs": [tensor("INPUT0", "FP32", [1, 1],
                                                                          binary_data_size=4.0)]}, b"\0" * 4))
    # JSON data whose shape declares more than the body holds, but at most safety.check's 16 MiB.
    for dt, count in (("FP32", 4_000_000), ("FP64", 2_000_000), ("INT8", 16_000_000), ("BOOL", 100_000),
                      ("BYTES", 2_000_000), ("FP16", 8_000_000), ("UINT64", 2_097_152), ("INT32", 1_000)):
        value: Any = "a" if dt == "BYTES" else (True if dt == "BOOL" else 1)
        cases.append(infer_case(f"json large shape {dt} {count}", {"inputs": [tensor("INPUT0", dt, [1, count],
                                                                                     [value])]}))
    for shape_text in (b"[-1,4]", b"[1.0,2.0]", b"[1,1e6]", b"[true,2]", b'[1,"5"]', b"[-5]", b"[]", b"{}",
                       b"null", b'"1,2"', b"[18446744073709551616]", b"[1,2,3,4,5,6,7,8]"):
        body = b'{"inputs":[{"name":"INPUT0","shape":' + shape_text + b',"datatype":"FP32","data":[1,2]}]}'
        cases.append(infer_case(f"json shape {shape_text.decode()}", body))
    return cases


def framing_cases() -> list[Case]:
    """Inference-Header-Content-Length against the body it describes."""
    header = {"inputs": [tensor("INPUT0", "FP32", [1, 2], binary_data_size=8)]}
    head, raw = js(header), raw_of("FP32", [1, 2])
    n = len(head)
    # Non-ASCII digits: superscript two, Arabic-Indic three, fullwidth one and two.
    values = [str(n + len(raw) + 1), str(n + 10_000), "-1", "-5", "abc", "\u00b2", "\u0663", "\uff11\uff12",
              "1" * 3000, "0", "-0", "00", f"+{n}", f" {n}", f"{n} ", f"{n}abc", str(n + 2**32), str(2**64),
              str(2**63), "", "0x10", str(n - 1), str(n + 1), "1e2", f"{n}.0", f"{n},{n}"]
    cases = [Case(f"header length {v[:20]!r}", "POST", INFER, head + raw,
                  (("Inference-Header-Content-Length", v.encode().decode("latin-1")),)) for v in values]
    cases.append(Case("bytes after the binary section", "POST", INFER, head + raw + b"extra",
                      (("Inference-Header-Content-Length", str(n)),)))
    cases.append(Case("binary section without header length", "POST", INFER, head + raw))
    cases.append(Case("header length on a JSON body", "POST", INFER, js(fp32([1.0])),
                      (("Inference-Header-Content-Length", str(len(js(fp32([1.0]))))),)))
    cases.append(Case("header length twice, same", "POST", INFER, head + raw,
                      (("Inference-Header-Content-Length", str(n)), ("Inference-Header-Content-Length", str(n)))))
    cases.append(Case("header length twice, different", "POST", INFER, head + raw,
                      (("Inference-Header-Content-Length", str(n)), ("Inference-Header-Content-Length", "3"))))
    two_head = js({"inputs": [tensor("INPUT0", "FP32", [4], binary_data_size=16),
                              tensor("INPUT1", "FP32", [4], binary_data_size=16)]})
    for i, tail in enumerate((raw_of("FP32", [1] * 8), raw_of("FP32", [1] * 7), raw_of("FP32", [1] * 9))):
        cases.append(Case(f"add_sub two binary inputs #{i}", "POST", "/v2/models/add_sub/infer", two_head + tail,
                          (("Inference-Header-Content-Length", str(len(two_head))),)))
    for i, items in enumerate(([b"ab"], [b"\xff\xfe"], [b""])):
        good = pack_bytes(items * 2)
        hb = js({"inputs": [tensor("INPUT0", "BYTES", [1, 2], binary_data_size=len(good))]})
        cases.append(Case(f"bytes binary #{i}", "POST", "/v2/models/bytes_echo/infer", hb + good,
                          (("Inference-Header-Content-Length", str(len(hb))),)))
    bad = struct.pack("<I", 100) + b"ab"
    hb = js({"inputs": [tensor("INPUT0", "BYTES", [1, 1], binary_data_size=len(bad))]})
    cases.append(Case("bytes binary length prefix past the end", "POST", "/v2/models/bytes_echo/infer", hb + bad,
                      (("Inference-Header-Content-Length", str(len(hb))),)))
    return cases


def json_oddity_cases() -> list[Case]:
    inp = b'{"name":"INPUT0","shape":[1,2],"datatype":"FP32","data":[1,2]}'
    with_inp = b'{"inputs":[' + inp + b"]"
    deep = {d: b"[" * d + b"]" * d for d in (1023, 1024, 1025, 2048, 4096)}
    bodies: dict[str, bytes] = {
        "empty body": b"", "whitespace body": b"  \n\t ", "array body": b"[]", "string body": b'"x"',
        "number body": b"1", "null body": b"null", "true body": b"true", "object without inputs": b"{}",
        "inputs null": b'{"inputs":null}', "inputs object": b'{"inputs":{}}', "inputs string": b'{"inputs":"x"}',
        "inputs empty": b'{"inputs":[]}', "input not object": b'{"inputs":[1]}', "input empty": b'{"inputs":[{}]}',
        "missing name": b'{"inputs":[{"shape":[1],"datatype":"FP32","data":[1]}]}',
        "missing datatype": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"data":[1]}]}',
        "missing shape": b'{"inputs":[{"name":"INPUT0","datatype":"FP32","data":[1]}]}',
        "missing data": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32"}]}',
        "datatype lower": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"fp32","data":[1]}]}',
        "datatype unknown": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP99","data":[1]}]}',
        "datatype number": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":32,"data":[1]}]}',
        "name number": b'{"inputs":[{"name":0,"shape":[1,1],"datatype":"FP32","data":[1]}]}',
        "data object": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32","data":{"a":1}}]}',
        "data scalar": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32","data":1}]}',
        "data null": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32","data":null}]}',
        "two inputs same name": b'{"inputs":[' + inp + b"," + inp + b"]}",
        "wrong input name": b'{"inputs":[{"name":"WRONG","shape":[1,1],"datatype":"FP32","data":[1]}]}',
        "unknown top-level field": with_inp + b',"extra":{"a":[1,2]}}',
        "unknown input field": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32","data":[1],"x":1}]}',
        "model_name field": with_inp + b',"model_name":"other","model_version":"9"}',
        "invalid utf-8 in id": b'{"id":"\xff\xfe","inputs":[' + inp + b"]}",
        "invalid utf-8 in name": b'{"inputs":[{"name":"INPUT\xc3","shape":[1,1],"datatype":"FP32","data":[1]}]}',
        "invalid utf-8 in key": b'{"\xe2\x82":1,"inputs":[' + inp + b"]}",
        "overlong utf-8": b'{"id":"\xc0\xaf","inputs":[' + inp + b"]}",
        "lone surrogate escape": b'{"id":"\\ud800","inputs":[' + inp + b"]}",
        "nul escape": b'{"id":"a\\u0000b","inputs":[' + inp + b"]}",
        "raw control char in string": b'{"id":"a\x01b","inputs":[' + inp + b"]}",
        "NaN data": b'{"inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32","data":[NaN,1]}]}',
        "Infinity data": b'{"inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32","data":[Infinity,-Infinity]}]}',
        "NaN parameter": b'{"parameters":{"x":NaN},"inputs":[' + inp + b"]}",
        "1e400 data": b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32","data":[1e400]}]}',
        "-0 and exponents": b'{"inputs":[{"name":"INPUT0","shape":[1,3],"datatype":"FP32","data":[-0,1E2,5e-324]}]}',
        "BOM": b"\xef\xbb\xbf" + with_inp + b"}",
        "trailing garbage": with_inp + b"} x",
        "trailing comma": with_inp + b",}",
        "comment": b"/* c */" + with_inp + b"}",
        "single quotes": b"{'inputs':[]}",
        "truncated": with_inp[:-5],
        "duplicate shape, first wrong": b'{"inputs":[{"name":"INPUT0","shape":[1,3],"shape":[1,2],"datatype":"FP32",'
                                        b'"data":[1,2]}]}',
        "duplicate inputs, first empty": b'{"inputs":[],' + with_inp[1:] + b"}",
        "duplicate id": b'{"id":"a","id":"b",' + with_inp[1:] + b"}",
    }
    for depth, nest in deep.items():
        bodies[f"nested {depth} deep in an unknown field"] = b'{"model_name":' + nest + b"," + with_inp[1:] + b"}"
        bodies[f"nested {depth} deep as data"] = (b'{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32",'
                                                  b'"data":' + b"[" * depth + b"1" + b"]" * depth + b"}]}")
    return [infer_case(f"json {name}", body) for name, body in bodies.items()]


def path_cases() -> list[Case]:
    body = js(fp32([1.0, 2.0]))
    infer_targets = [
        "/v2/models/identity_fp32/versions/1/infer", "/v2/models/identity_fp32/versions/2/infer",
        "/v2/models/identity_fp32/versions/01/infer", "/v2/models/identity_fp32/versions/abc/infer",
        "/v2/models/identity_fp32/versions/-1/infer", "/v2/models/identity_fp32/versions//infer",
        "/v2/models/identity_fp32/versions/99999999999999999999/infer", "/v2/models/nope/infer",
        "/v2/models/nope/versions/1/infer", "/v2/models//infer", "/v2/models/identity_fp32/../identity_fp32/infer",
        "/v2/models/identity_fp32/./infer", "/v2/models/identity%5ffp32/infer", "/v2/models/identity%5Ffp32/infer",
        "/v2/models/identity_fp32%2Finfer", "/v2/models/%69dentity_fp32/infer", "//v2/models/identity_fp32/infer",
        "/v2//models/identity_fp32/infer", "/v2/models/identity_fp32/infer/", "/v2/models/identity_fp32/infer?x=1",
        "/v2/models/identity_fp32/infer?", "/V2/models/identity_fp32/infer", "/v2/models/IDENTITY_FP32/infer",
        "/v2/models/identity_fp32/INFER", "/v2/models/identity_fp32/infer;x", "/v2/models/h%C3%A9llo/infer",
        "/v2/models/héllo/infer", "/v2/models/" + "m" * 3000 + "/infer", "/v2/models/identity_fp32/inferx",
        "/v2/models/identity_fp32/generate", "/v2/models/identity_fp32/generate_stream",
        "/v2/models/identity_fp32/versions/1/generate",
    ]
    cases = [Case(f"POST {t[:80]}", "POST", t.encode().decode("latin-1"), body, JSON_CT) for t in infer_targets]
    get_targets = [
        "/v2/health/./ready", "/v2/health/../health/live", "/v2/health/ready/", "/v2/health/ready?verbose=1",
        "/v2/health/%72eady", "/v2/health//ready", "/v2/models/identity%5ffp32", "/v2/models/identity_fp32/../add_sub",
        "/v2/models/identity_fp32/versions/1", "/v2/models/identity_fp32/versions/2",
        "/v2/models/identity_fp32/versions/7/ready",
        "/v2/models/nope/ready", "/v2/models/nope/config", "/v2/models/identity_fp32/config?x",
        "/v2/models/%2e%2e/health/ready", "/%76%32/health/live", "/v2/models/h%C3%A9llo", "/v2/%00",
        "/" + "a" * 4000, "*", "/v2/models/a%20b", "/v2/models/%zz", "/v2/models/%", "/v2\\health\\ready",
        "/v2/models/a|b", '/v2/models/a"b', "/v2/models/{a}", "/v2/models/a^b", "/v2/models/a`b", "/v2/models/<a>",
        "http://localhost/v2/health/ready", "http://other:1/v2/models/identity_fp32", "http://localhost",
        "/v2/health/ready?a=%zz&b", "/v2/models/identity_fp32?" + "q" * 3000, "*?x=1", "*x",
    ]
    cases += [Case(f"GET {t[:80]}", "GET", t, None) for t in get_targets]
    cases += [
        Case("OPTIONS *", "OPTIONS", "*"),
        Case("OPTIONS *x", "OPTIONS", "*x"),
        Case("POST *?x", "POST", "*?x", b"{}", JSON_CT),
        Case("POST absolute-form infer", "POST", "http://localhost/v2/models/identity_fp32/infer", body, JSON_CT),
        Case("POST absolute-form other host", "POST", "http://other:8000/v2/models/identity_fp32/infer", body),
        Case("HTTP/1.0 GET ready", "GET", "/v2/health/ready", version="1.0"),
        Case("HTTP/1.0 GET config", "GET", "/v2/models/identity_fp32/config", version="1.0"),
        Case("HTTP/1.0 POST infer", "POST", INFER, body, JSON_CT, version="1.0"),
        Case("HTTP/1.0 POST index", "POST", "/v2/repository/index", b"{}", JSON_CT, version="1.0"),
    ]
    return cases


def method_cases() -> list[Case]:
    paths = [
        "/", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/identity_fp32",
        "/v2/models/identity_fp32/ready", "/v2/models/identity_fp32/versions/1/ready",
        "/v2/models/identity_fp32/config", "/v2/models/identity_fp32/infer", "/v2/repository/index",
        "/v2/systemsharedmemory/status", "/v2/trace/setting", "/v2/logging", "/v2/models/nope",
        "/v1/models/identity_fp32", "/v2/repository/models/nope/load", "/v2/repository/models/nope/unload",
    ]
    cases: list[Case] = []
    for path in paths:
        for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"):
            cases.append(Case(f"{method} {path}", method, path))
        cases.append(Case(f"POST {path} empty", "POST", path, b""))
        cases.append(Case(f"POST {path} {{}}", "POST", path, b"{}", JSON_CT))
        cases.append(Case(f"GET {path} with body", "GET", path, b"{}", JSON_CT))
    for path in ("/v2/repository/index", "/v2/models/identity_fp32/infer", "/v2/health/ready"):
        cases.append(Case(f"TRACE {path}", "TRACE", path))
        # Methods llhttp knows beyond the common ones, and one it does not (any token is a method: RFC 9110).
        for method in ("PROPFIND", "PURGE", "MKCOL", "LINK", "SEARCH", "REPORT", "ACL", "FOO"):
            cases.append(Case(f"{method} {path}", method, path, b"{}" if method != "PURGE" else None))
        cases.append(Case(f"POST {path} not json", "POST", path, b"{nope", JSON_CT))
    cases += [
        Case("repository index ready only", "POST", "/v2/repository/index", js({"ready": True}), JSON_CT),
        Case("repository index ready false", "POST", "/v2/repository/index", js({"ready": False}), JSON_CT),
        Case("repository index ready string", "POST", "/v2/repository/index", js({"ready": "yes"}), JSON_CT),
        Case("repository index array", "POST", "/v2/repository/index", b"[]", JSON_CT),
        Case("load unknown with config", "POST", "/v2/repository/models/nope/load",
             js({"parameters": {"config": "{}"}}), JSON_CT),
        Case("model trace setting", "GET", "/v2/models/identity_fp32/trace/setting"),
        Case("trace setting empty update", "POST", "/v2/trace/setting", b"{}", JSON_CT),
        Case("trace setting bad update", "POST", "/v2/trace/setting", js({"trace_level": 5}), JSON_CT),
        Case("logging bad update", "POST", "/v2/logging", js({"log_verbose_level": "x"}), JSON_CT),
        Case("generate bad body", "POST", "/v2/models/identity_fp32/generate", b"{nope", JSON_CT),
        Case("generate_stream unknown model", "POST", "/v2/models/nope/generate_stream", b"{}", JSON_CT),
    ]
    return cases


def header_cases() -> list[Case]:
    body = js(fp32([4.0, 5.0]))
    variants: list[tuple[str, HeaderPairs]] = [
        ("no content-type", ()), ("text/plain", (("Content-Type", "text/plain"),)),
        ("octet-stream", (("Content-Type", "application/octet-stream"),)),
        ("json charset", (("Content-Type", "application/json; charset=utf-8"),)),
        ("expect 100-continue", (("Expect", "100-continue"),)), ("expect other", (("Expect", "something"),)),
        ("x-request-id", (("x-request-id", "abc-123"),)), ("connection close", (("Connection", "close"),)),
        ("te trailers", (("TE", "trailers"),)), ("triton-grpc style header", (("triton-request-id", "7"),)),
        ("obs-text value", (("X-Odd", "caf\xe9"),)), ("many headers", tuple((f"X-H{i}", "v" * 50) for i in range(80))),
        ("upgrade websocket", (("Connection", "Upgrade"), ("Upgrade", "websocket"))),
        ("upgrade h2c", H2C_UPGRADE),
    ]
    cases = [Case(f"infer header {n}", "POST", INFER, body, h) for n, h in variants]
    cases += [Case(f"chunked infer split {n}", "POST", INFER,
                   chunks=tuple(body[i:i + n] for i in range(0, len(body), n))) for n in (1, 7, 64, 1000)]
    cases.append(Case("chunked repository index", "POST", "/v2/repository/index", chunks=(b"{", b"}")))
    upgrade = (("Connection", "Upgrade"), ("Upgrade", "websocket"))
    cases += [
        Case("upgrade repository index with body", "POST", "/v2/repository/index", js({"ready": True}),
             (*JSON_CT, *upgrade)),
        Case("upgrade GET ready", "GET", "/v2/health/ready", None, upgrade),
        Case("upgrade h2c GET config", "GET", "/v2/models/identity_fp32/config", None, H2C_UPGRADE),
        Case("upgrade chunked infer", "POST", INFER, chunks=(body[:10], body[10:]), headers=upgrade),
    ]
    cases.append(Case("chunked empty infer", "POST", INFER, chunks=()))
    return cases


def mutation_cases(count: int = 120) -> list[Case]:
    """Seeded byte-level mutations of valid JSON and binary bodies."""
    rng = random.Random(SEED)
    seeds = [js(fp32([1.0, 2.0, 3.0], id="m")),
             js({"inputs": [tensor("INPUT0", "BYTES", [1, 2], ["ab", "c"])], "outputs": [{"name": "OUTPUT0"}]})]
    bin_head = js({"inputs": [tensor("INPUT0", "FP32", [1, 2], binary_data_size=8)]})
    cases: list[Case] = []
    for i in range(count):
        binary = i % 3 == 2
        original = bin_head + raw_of("FP32", [1, 2]) if binary else seeds[i % 2]
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.randrange(4), rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos]
            elif op == 2:
                data.insert(pos, rng.choice(b'{}[],:"\\0123456789e-. \xff'))
            else:
                data = data[:pos]
                break
        model = "bytes_echo" if i % 3 == 1 else "identity_fp32"
        headers: HeaderPairs = (("Inference-Header-Content-Length", str(len(bin_head))),) if binary else JSON_CT
        cases.append(Case(f"mutation #{i}", "POST", f"/v2/models/{model}/infer", bytes(data), headers))
    return cases


def large_body_cases() -> list[Case]:
    """Bodies over limits.inline_decode_bytes (256 KiB): the sidecar decodes them in its worker process."""
    rng = np.random.default_rng(SEED + 2)
    values = rng.standard_normal(40_000).astype(np.float32)
    inp = httpclient.InferInput("INPUT0", [1, values.size], "FP32")
    inp.set_data_from_numpy(values.reshape(1, -1), binary_data=True)
    binary, json_size = httpclient.InferenceServerClient.generate_request_body([inp])
    big_json = js(fp32([float(v) for v in values[:30_000]], id="large"))
    return [
        infer_case("large JSON infer", big_json),
        infer_case("large JSON infer, shape one short", fp32([float(v) for v in values[:30_000]], [1, 30_001])),
        Case("large binary infer", "POST", INFER, binary, (("Inference-Header-Content-Length", str(json_size)),)),
        Case("large binary infer, one byte short", "POST", INFER, binary[:-1],
             (("Inference-Header-Content-Length", str(json_size)),)),
        Case("large gzip infer", "POST", INFER, gzip.compress(big_json), (("Content-Encoding", "gzip"),)),
        infer_case("large bytes_echo", {"inputs": [tensor("INPUT0", "BYTES", [1, 3], ["x" * 100_000, "é" * 50_000,
                                                                                      ""])]}, "bytes_echo"),
        infer_case("large not json", b"{" + b" " * 300_000),
    ]


def triton_corpus() -> list[Case]:
    return [*stats_cases(), *datatype_cases(), *tritonclient_cases(), *output_cases(), *id_and_parameter_cases(),
            *compression_cases(), *shared_memory_cases(), *shape_cases(), *framing_cases(), *json_oddity_cases(),
            *large_body_cases(), *path_cases(), *method_cases(), *header_cases(), *mutation_cases()]


# -- the TF Serving REST corpus -----------------------------------------------------------------------


def tfserving_corpus(model: str) -> list[Case]:
    rng = random.Random(SEED + 1)
    predict = f"/v1/models/{model}:predict"
    bodies: list[tuple[str, bytes]] = []
    for i in range(30):  # row and columnar, random shapes and numbers
        rows, width = rng.randint(0, 4), rng.randint(1, 4)
        values = [[round(rng.uniform(-1e6, 1e6), rng.randint(0, 6)) if rng.random() < 0.7 else rng.randint(-9, 9)
                   for _ in range(width)] for _ in range(rows)]
        if i % 3 == 0:
            doc: Any = {"instances": values}
        elif i % 3 == 1:
            doc = {"inputs": values} if i % 2 else {"inputs": {"x": values, "y": [rng.random()]}}
        else:
            doc = {"signature_name": "serving_default", "instances": [{"x": row} for row in values]}
        bodies.append((f"random #{i}", js(doc)))
    bodies += [
        ("b64 instances", js({"instances": [{"b64": "AAEC"}, {"b64": "/w=="}]})),
        ("b64 named input", js({"instances": [{"image_bytes": {"b64": "aGVsbG8="}}]})),
        ("b64 bad", js({"instances": [{"b64": "!!!"}]})),
        ("strings", js({"instances": ["a", "b"]})), ("booleans", js({"instances": [True, False]})),
        ("nested 3d", js({"instances": [[[1, 2], [3, 4]]]})), ("ragged", js({"instances": [[1, 2], [3]]})),
        ("empty instances", js({"instances": []})), ("empty object", b"{}"), ("both keys", js({"instances": [1],
                                                                                              "inputs": [1]})),
        ("NaN token", b'{"instances":[NaN, 1.0]}'), ("Infinity tokens", b'{"instances":[Infinity, -Infinity]}'),
        ("nan lowercase", b'{"instances":[nan]}'), ("1e400", b'{"instances":[1e400]}'),
        ("huge int", b'{"instances":[18446744073709551616]}'), ("-0", b'{"instances":[-0, -0.0]}'),
        ("not json", b"{nope"), ("empty body", b""), ("array body", b"[1,2]"), ("string body", b'"x"'),
        ("invalid utf-8", b'{"instances":["\xff"]}'), ("BOM", b'\xef\xbb\xbf{"instances":[1]}'),
        ("trailing garbage", b'{"instances":[1]} x'), ("deep 1025", b'{"instances":' + b"[" * 1025 + b"1"
                                                          + b"]" * 1025 + b"}"),
        ("duplicate keys", b'{"instances":[1],"instances":[2]}'), ("instances null", b'{"instances":null}'),
        ("instances object", b'{"instances":{"a":1}}'), ("unknown field", b'{"instances":[1],"x":{"y":1}}'),
    ]
    cases = [Case(f"tf predict {n}", "POST", predict, b, JSON_CT) for n, b in bodies]
    gz = js({"instances": [[1.0, 2.0]]})
    cases += [
        Case("tf predict gzip", "POST", predict, gzip.compress(gz), (*JSON_CT, ("Content-Encoding", "gzip"))),
        Case("tf predict no content-type", "POST", predict, gz),
        Case("tf predict text/plain", "POST", predict, gz, (("Content-Type", "text/plain"),)),
        Case("tf predict chunked", "POST", predict, chunks=(gz[:5], gz[5:]), headers=JSON_CT),
        Case("tf predict accept gzip", "POST", predict, js({"instances": list(range(500))}),
             (*JSON_CT, ("Accept-Encoding", "gzip"))),
        Case("tf predict large rows", "POST", predict, js({"instances": [[rng.random() for _ in range(8)]
                                                                         for _ in range(4000)]}), JSON_CT),
        Case("tf predict large columnar", "POST", predict, js({"inputs": {"x": [rng.random() for _ in range(30_000)]}}),
             JSON_CT),
    ]
    examples = js({"examples": [{"x": [1.0], "y": ["a"]}], "context": {"z": [1]}})
    for verb in ("classify", "regress", "predict", "explain", "PREDICT", "nope"):
        for target in (f"/v1/models/{model}:{verb}", f"/v1/models/{model}/versions/1:{verb}",
                       f"/v1/models/{model}/labels/stable:{verb}", f"/v1/models/nope:{verb}"):
            cases.append(Case(f"tf {target}", "POST", target, examples, JSON_CT))
    for target in (f"/v1/models/{model}", f"/v1/models/{model}/metadata", f"/v1/models/{model}/versions/1",
                   f"/v1/models/{model}/versions/1/metadata", f"/v1/models/{model}/labels/stable", "/v1/models/nope",
                   "/v1/models/nope/metadata", "/v1/models", "/", "/v2/health/ready", "/v2/health/live",
                   f"/v2/models/{model}", f"/v2/models/{model}/ready", f"/v1/models/{model}/", "/v1/models/%74fmodel",
                   f"/v1/models/{model}/../{model}", f"/v1/models/{model}?x=1", "/docs"):
        for method in ("GET", "HEAD", "DELETE"):
            cases.append(Case(f"tf {method} {target}", method, target))
    for target in (f"/v1/models/{model}%3Apredict", f"/v1/models/{model}:predict/", f"//v1/models/{model}:predict",
                   f"/v1/models/{model}/versions/abc:predict", f"/v1/models/{model}:predict?x=1",
                   f"/v2/models/{model}/infer", f"/v1/models/{model}/../{model}:predict"):
        cases.append(Case(f"tf POST {target}", "POST", target, gz, JSON_CT))
    return cases


# -- the tests ----------------------------------------------------------------------------------------


def assert_no_mismatch(mismatches: list[str], total: int) -> None:
    assert not mismatches, f"{len(mismatches)} of {total} calls answered differently through the sidecar:\n" + \
        "\n".join(mismatches)


@pytest.fixture(scope="module")
def sidecar_workers(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """The session Triton behind a sidecar of two data-plane workers."""
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("workers"), "triton", ["--set", "workers=2"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def kserve_sidecar_workers(kserve: KServeServer, tmp_path_factory: pytest.TempPathFactory
                           ) -> Iterator[SidecarProcess]:
    args = ["--set", f"upstream.models={kserve.model}", "--set", "workers=2"]
    with SidecarProcess(kserve.url, tmp_path_factory.mktemp("ks-workers"), "tfserving", args) as proc:
        yield proc


@pytest.mark.parametrize("front", ["sidecar", "sidecar_workers"])
def test_triton_corpus_is_answered_identically(triton: TritonServer, front: str,
                                               request: pytest.FixtureRequest) -> None:
    sidecar: SidecarProcess = request.getfixturevalue(front)
    cases = triton_corpus()
    assert len(cases) >= 500
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    # Never sent to Triton directly: each would abort it (they are unsafe_cases' business).
    assert not [c.name for c in cases if refused_by_sidecar(c)]
    mismatches, statuses = differences(triton.url, sidecar.url, cases)
    # The corpus means something: plenty of successes and plenty of Triton's own refusals.
    assert statuses[200] >= 80 and statuses[400] >= 80, statuses
    assert_no_mismatch(mismatches, len(cases))
    assert triton.running and http_status(triton.http_port, "/v2/health/live") == 200


@pytest.mark.parametrize("front", ["kserve_sidecar", "kserve_sidecar_workers"])
def test_tfserving_corpus_is_answered_identically(kserve: KServeServer, front: str,
                                                  request: pytest.FixtureRequest) -> None:
    kserve_sidecar: SidecarProcess = request.getfixturevalue(front)
    cases = tfserving_corpus(kserve.model)
    assert len(cases) >= 140
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    mismatches, statuses = differences(kserve.url, kserve_sidecar.url, cases)
    assert statuses[200] >= 30 and statuses[400] >= 10, statuses
    assert_no_mismatch(mismatches, len(cases))


# -- safety.check ------------------------------------------------------------------------------------

UNSAFE_INPUT = tensor("INPUT0", "FP32", [1, 2**40], [1])


def unsafe_cases() -> list[Case]:
    """Calls safety.check must answer itself: never sent to Triton directly."""
    cases: list[Case] = []
    for dt in DTYPES:
        data = ["a"] if dt == "BYTES" else [1]
        cases.append(infer_case(f"unsafe {dt}", {"inputs": [tensor("INPUT0", dt, [2**31, 2**31], data)]}))
    second = {"inputs": [tensor("INPUT0", "FP32", [4], [1, 2, 3, 4]), tensor("INPUT1", "FP32", [2**40], [])]}
    cases += [
        infer_case("unsafe second input", second, "add_sub"),
        infer_case("unsafe many dimensions", {"inputs": [tensor("INPUT0", "FP32", list(range(1, 18)), [1, 2])]}),
        infer_case("unsafe unknown model", {"inputs": [UNSAFE_INPUT]}, "nope"),
        infer_case("unsafe versioned path", {"inputs": [UNSAFE_INPUT]},
                   target="/v2/models/identity_fp32/versions/1/infer"),
        infer_case("unsafe percent-encoded path", {"inputs": [UNSAFE_INPUT]},
                   target="/v2/models/identity%5ffp32/infer"),
        infer_case("unsafe with unknown fields", {"inputs": [UNSAFE_INPUT | {"x": 1}], "y": [1]}),
        infer_case("unsafe with a wrong datatype", {"inputs": [tensor("INPUT0", "FP99", [1, 2**40], [1])]}),
        infer_case("unsafe gzip", gzip.compress(js({"inputs": [UNSAFE_INPUT]})),
                   headers=(("Content-Encoding", "gzip"),)),
        infer_case("unsafe deflate", zlib.compress(js({"inputs": [UNSAFE_INPUT]})),
                   headers=(("Content-Encoding", "deflate"),)),
        # Over limits.inline_decode_bytes: decoded in the worker process.
        infer_case("unsafe large body", {"inputs": [UNSAFE_INPUT], "parameters": {"pad": "x" * 400_000}}),
        Case("unsafe chunked", "POST", INFER, chunks=(js({"inputs": [UNSAFE_INPUT]})[:30],
                                                      js({"inputs": [UNSAFE_INPUT]})[30:])),
    ]
    head = js({"inputs": [tensor("INPUT0", "FP32", [4], binary_data_size=16), UNSAFE_INPUT | {"name": "INPUT1"}]})
    cases.append(Case("unsafe JSON input beside a binary one", "POST", "/v2/models/add_sub/infer",
                      head + raw_of("FP32", [1, 2, 3, 4]), (("Inference-Header-Content-Length", str(len(head))),)))
    return cases


def assert_refused(answer: Answer, name: str) -> str | None:
    """None when ``answer`` is the sidecar's own refusal naming the shape; else what is wrong with it."""
    if answer.status not in (400, 413) or answer.header("Content-Type") != "application/json":
        return f"{name}: {answer.status} {answer.body[:160]!r}"
    if answer.status == 413 and b"decompresses" in answer.body:
        return None  # a compressed body expanding past the body limit: the sidecar's own limit, before any check
    error = orjson.loads(answer.body).get("error", "")
    if not re.search(r"inputs\[\d+\]\.shape: declares \d+ elements|declares a huge shape", error):
        return f"{name}: 400 without naming the shape: {error[:160]!r}"
    return None


def refusal_failures(proc: SidecarProcess, cases: list[Case]) -> list[str]:
    failures = []
    with KeepAlive(proc.url) as conn:
        for case in cases:
            failure = assert_refused(conn.exchange(case), case.name)
            if failure:
                failures.append(failure)
    return failures


def test_unsafe_shapes_are_refused_and_triton_survives(triton: TritonServer, sidecar: SidecarProcess) -> None:
    cases = unsafe_cases()
    assert all(refused_by_sidecar(c) for c in cases)
    failures = refusal_failures(sidecar, cases)
    assert not failures, "\n".join(failures)
    assert triton.running and http_status(triton.http_port, "/v2/health/live") == 200
    assert http_status(sidecar.port, "/v2/health/ready") == 200


def smuggled_cases() -> list[Case]:
    """The same danger where the sidecar's codec cannot see it but Triton's parser does (each one, sent to
    Triton directly, aborts it). Triton reads JSON that orjson refuses, takes the first of duplicate keys
    and headers, reads Inference-Header-Content-Length leniently (a sign, trailing junk, 32-bit wrap-around),
    and inflates bodies past the sidecar's decoding limit."""
    unsafe = js(UNSAFE_INPUT)
    safe = js(tensor("INPUT0", "FP32", [1, 1], [1]))
    plain = b'{"inputs":[' + unsafe + b"]}"
    n = len(plain)
    length = "Inference-Header-Content-Length"
    bodies = {
        "invalid UTF-8 elsewhere": b'{"id":"\xff","inputs":[' + unsafe + b"]}",
        "NaN token elsewhere": b'{"parameters":{"x":NaN},"inputs":[' + unsafe + b"]}",
        "byte order mark": b"\xef\xbb\xbf" + plain,
        "nesting past 1024 elsewhere": b'{"model_name":' + b"[" * 1100 + b"]" * 1100 + b',"inputs":[' + unsafe + b"]}",
        "duplicate shape key": b'{"inputs":[{"name":"INPUT0","shape":[1,1099511627776],"shape":[1,1],'
                               b'"datatype":"FP32","data":[1]}]}',
        "duplicate inputs key": b'{"inputs":[' + unsafe + b'],"inputs":[' + safe + b"]}",
    }
    cases = [infer_case(f"smuggled: {name}", body) for name, body in bodies.items()]
    for name, value in (("sign", f"+{n}"), ("trailing junk", f"{n}abc"), ("32-bit wrap-around", str(n + 2**32))):
        cases.append(Case(f"smuggled: header length with {name}", "POST", INFER, plain, ((length, value),)))
    cases.append(Case("smuggled: two header lengths, Triton reads the first", "POST", INFER, plain,
                      ((length, str(n)), (length, "3"))))
    bomb = gzip.compress(b" " * (64 * 1024 * 1024 + 1) + plain, 9)
    cases.append(Case("smuggled: gzip inflating past the decoding limit", "POST", INFER, bomb,
                      (("Content-Encoding", "gzip"),)))
    return cases


@pytest.fixture(scope="module")
def private_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, SidecarProcess]]:
    """A Triton and a sidecar of this module's own: a call that gets past the refusal aborts this Triton only."""
    workdir = tmp_path_factory.mktemp("smuggle")
    with TritonServer(MODELS_DIR, workdir / "triton", models=["identity_fp32"]) as triton_server, \
            SidecarProcess(triton_server.url, workdir, "triton") as proc:
        yield triton_server, proc


def test_unsafe_shapes_cannot_be_smuggled_past_the_refusal(
        private_triton: tuple[TritonServer, SidecarProcess]) -> None:
    triton_server, proc = private_triton
    failures = refusal_failures(proc, smuggled_cases())
    alive = triton_server.running and http_status(triton_server.http_port, "/v2/health/live") == 200
    assert not failures and alive, (f"Triton alive afterwards: {alive}; calls not refused by the sidecar "
                                    f"(so forwarded to Triton):\n" + "\n".join(failures))

