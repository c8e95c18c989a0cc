"""The HTTP data path against a real Triton: through the sidecar is byte-for-byte direct."""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from tests.servers import TritonServer
from tests.sidecar_proc import SidecarProcess
from tests.wire import Answer, exchange

JSON = {"Content-Type": "application/json"}


def infer_json(values: list[float], model: str = "identity_fp32", **extra: object) -> bytes:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, len(values)], "datatype": "FP32", "data": values}]}
    body.update(extra)
    return orjson.dumps(body)


def both(triton: TritonServer, sidecar: SidecarProcess, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[Answer, Answer]:
    direct = exchange(triton.url, method, path, body, headers)
    proxied = exchange(sidecar.url, method, path, body, headers)
    return direct, proxied


def assert_same(direct: Answer, proxied: Answer) -> None:
    assert proxied.status == direct.status
    assert proxied.body == direct.body
    assert proxied.stable_headers() == direct.stable_headers()


def test_infer_json_is_byte_identical(triton: TritonServer, sidecar: SidecarProcess) -> None:
    body = infer_json([1.5, -2.0, 3.25], id="req-7")
    direct, proxied = both(triton, sidecar, "POST", "/v2/models/identity_fp32/infer", body, JSON)
    assert direct.status == 200
    assert orjson.loads(proxied.body)["id"] == "req-7"
    assert_same(direct, proxied)


def test_infer_binary_extension_is_byte_identical(triton: TritonServer, sidecar: SidecarProcess) -> None:
    inp = httpclient.InferInput("INPUT0", [2, 3], "FP32")
    inp.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), binary_data=True)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    direct, proxied = both(triton, sidecar, "POST", "/v2/models/identity_fp32/infer", body, headers)
    assert direct.status == 200 and direct.header("Inference-Header-Content-Length")
    assert_same(direct, proxied)
    result = httpclient.InferenceServerClient.parse_response_body(
        proxied.body, header_length=int(proxied.header("Inference-Header-Content-Length") or 0))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_bytes_tensor(triton: TritonServer, sidecar: SidecarProcess) -> None:
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "BYTES",
                                     "data": ["héllo", "wörld"]}]})
    direct, proxied = both(triton, sidecar, "POST", "/v2/models/bytes_echo/infer", body, JSON)
    assert direct.status == 200
    assert_same(direct, proxied)


@pytest.mark.parametrize(
    "path",
    [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/identity_fp32",
        "/v2/models/identity_fp32/ready",
        "/v2/models/identity_fp32/config",
        "/v2/models/identity_fp32/versions/1",
        "/v2/models/no_such_model",
        "/no/such/path",
    ],
)
def test_get_paths_are_byte_identical(triton: TritonServer, sidecar: SidecarProcess, path: str) -> None:
    assert_same(*both(triton, sidecar, "GET", path))


def test_repository_index_is_byte_identical(triton: TritonServer, sidecar: SidecarProcess) -> None:
    assert_same(*both(triton, sidecar, "POST", "/v2/repository/index", b"{}", JSON))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/no_such_model/infer", infer_json([1.0])),
        # The codec accepts it (data matches shape); Triton rejects the shape for add_sub's dims [4].
        ("/v2/models/add_sub/infer", orjson.dumps({"inputs": [
            {"name": "INPUT0", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "INPUT1", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]})),
        ("/v2/models/identity_fp32/infer", orjson.dumps({"inputs": [
            {"name": "WRONG", "shape": [1, 1], "datatype": "FP32", "data": [1]}]})),
        ("/v2/models/identity_fp32/versions/9/infer", infer_json([1.0])),
    ],
)
def test_upstream_errors_are_byte_identical(
    triton: TritonServer, sidecar: SidecarProcess, path: str, body: bytes
) -> None:
    direct, proxied = both(triton, sidecar, "POST", path, body, JSON)
    assert direct.status >= 400
    assert_same(direct, proxied)
    assert "error" in orjson.loads(proxied.body)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}),
        orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP99", "data": [1]}]}),
        orjson.dumps({"inputs": "nope"}),
    ],
)
def test_malformed_infer_gets_the_model_servers_own_answer(triton: TritonServer, sidecar: SidecarProcess,
                                                           body: bytes) -> None:
    """A call the codecs cannot model goes upstream untouched: the caller sees exactly Triton's answer."""
    direct, proxied = both(triton, sidecar, "POST", "/v2/models/identity_fp32/infer", body, JSON)
    assert direct.status >= 400
    assert_same(direct, proxied)


def test_a_shape_that_would_abort_triton_is_refused_with_400(sidecar: SidecarProcess) -> None:
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2**40], "datatype": "FP32", "data": [1]}]})
    answer = exchange(sidecar.url, "POST", "/v2/models/identity_fp32/infer", body, JSON)
    assert answer.status == 400
    assert answer.header("Content-Type") == "application/json"
    assert "inputs[0].shape" in orjson.loads(answer.body)["error"]
    assert exchange(sidecar.url, "GET", "/v2/health/live").status == 200  # Triton is still there


def test_request_id_is_propagated_or_created(sidecar: SidecarProcess) -> None:
    given = exchange(sidecar.url, "GET", "/v2/health/ready", headers={"x-request-id": "abc-123"})
    assert given.header("x-request-id") == "abc-123"
    made = exchange(sidecar.url, "GET", "/v2/health/ready")
    assert re.fullmatch(r"[0-9a-f]{32}", made.header("x-request-id") or "")


def test_fifty_megabyte_body_passes(triton: TritonServer, sidecar: SidecarProcess) -> None:
    values = np.random.default_rng(1).random(50 * 1024 * 1024 // 4, dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", [values.size], "FP32")
    inp.set_data_from_numpy(values, binary_data=True)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
    assert len(body) > 50_000_000
    headers = {"Inference-Header-Content-Length": str(json_size)}
    proxied = exchange(sidecar.url, "POST", "/v2/models/big/infer", body, headers, timeout=120)
    assert proxied.status == 200, proxied.body[:300]
    header_length = int(proxied.header("Inference-Header-Content-Length") or 0)
    assert hashlib.sha256(proxied.body[header_length:]).digest() == hashlib.sha256(values.tobytes()).digest()


async def test_64_concurrent_clients_each_get_their_own_answer(sidecar: SidecarProcess) -> None:
    async def one(session: aiohttp.ClientSession, i: int) -> None:
        values = [float(i), float(i) + 0.5, -float(i)]
        for _ in range(5):
            async with session.post(f"{sidecar.url}/v2/models/identity_fp32/infer",
                                    data=infer_json(values, id=f"c{i}"), headers=JSON) as resp:
                assert resp.status == 200
                answer = orjson.loads(await resp.read())
            assert answer["id"] == f"c{i}"
            assert answer["outputs"][0]["data"] == values

    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session, i) for i in range(64))), 120)


def test_metrics_count_requests(sidecar: SidecarProcess) -> None:
    exchange(sidecar.url, "POST", "/v2/models/identity_fp32/infer", infer_json([1.0]), JSON)
    text = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
    assert re.search(r'sidecar_requests_total\{model="identity_fp32",route="infer",status="200"\} \d', text)
    assert "sidecar_upstream_duration_seconds_bucket" in text
    assert "sidecar_in_flight_requests" in text
    assert "sidecar_upstream_errors_total" in text or "# TYPE sidecar_upstream_errors" in text


def test_binary_output_of_bytes_model_round_trips(sidecar: SidecarProcess) -> None:
    # Exercises BYTES in the binary extension: 4-byte length prefixes travel unchanged.
    inp = httpclient.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(np.array([[b"a\x00b", b""]], dtype=np.object_), binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)])
    answer = exchange(sidecar.url, "POST", "/v2/models/bytes_echo/infer", body,
                      {"Inference-Header-Content-Length": str(json_size)})
    assert answer.status == 200
    header_length = int(answer.header("Inference-Header-Content-Length") or 0)
    tail = answer.body[header_length:]
    assert tail == struct.pack("<I", 3) + b"a\x00b" + struct.pack("<I", 0)
