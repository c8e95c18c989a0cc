"""TF Serving over gRPC: wire compatibility of the project's messages, and every RPC through a sidecar.

TF Serving's binary cannot be installed here, so the model server is a stand-in built from the project's
own proto files (PredictionService + ModelService servicers over canned answers, in a thread of this
process) beside a small REST server for the status the sidecar's monitor reads. The messages themselves
are checked against hand-written protobuf wire bytes (upstream's field numbers) and against classes
compiled independently from proto/ by grpc_tools in a separate interpreter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp import web

from sidecar.errors import DecodeError
from sidecar.protocols import tfserving_grpc
from sidecar.protogen.grpc.health.v1 import health_pb2
from sidecar.protogen.tensorflow.core.framework import tensor_pb2, types_pb2
from sidecar.protogen.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tests.servers import HOST, REPO_ROOT, free_ports, wait_until
from tests.sidecar_proc import SidecarProcess
from tests.wire import exchange

PREDICT = "/tensorflow.serving.PredictionService/Predict"
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
LOADING = get_model_status_pb2.ModelVersionStatus.LOADING


def tensor(values: np.ndarray) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=values.astype("<f4").tobytes())
    proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=d) for d in values.shape)
    return proto


def predict_request(values: np.ndarray, model: str = "m") -> bytes:
    msg = predict_pb2.PredictRequest()
    msg.model_spec.name = model
    msg.inputs["x"].CopyFrom(tensor(values))
    return bytes(msg.SerializeToString())


def floats(proto: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [d.size for d in proto.tensor_shape.dim]
    assert proto.dtype == types_pb2.DT_FLOAT
    return np.frombuffer(proto.tensor_content, "<f4").reshape(shape)


# -- wire compatibility -----------------------------------------------------------------------------------


def _hand_written_predict_request() -> bytes:
    """PredictRequest{model_spec{name "m", version 3, signature_name "sig"}, inputs{"x": DT_FLOAT [2]},
    output_filter "y"}, written byte by byte from upstream's field numbers."""
    spec = b"\x0a\x01m" + b"\x12\x02\x08\x03" + b"\x1a\x03sig"  # name=1, version=2 (Int64Value.value=1), sig=3
    content = np.array([1.5, -2.0], "<f4").tobytes()
    proto = b"\x08\x01" + b"\x12\x04\x12\x02\x08\x02" + b"\x22\x08" + content  # dtype=1, shape=2{dim=2{size=1}}, 4
    entry = b"\x0a\x01x" + b"\x12" + bytes([len(proto)]) + proto
    return b"\x0a" + bytes([len(spec)]) + spec + b"\x12" + bytes([len(entry)]) + entry + b"\x1a\x01y"


def test_messages_match_hand_written_wire_bytes() -> None:
    msg = predict_pb2.PredictRequest(output_filter=["y"])
    msg.model_spec.name, msg.model_spec.signature_name = "m", "sig"
    msg.model_spec.version.value = 3
    msg.inputs["x"].CopyFrom(tensor(np.array([1.5, -2.0])))
    assert msg.SerializeToString() == _hand_written_predict_request()
    status = get_model_status_pb2.GetModelStatusResponse()
    status.model_version_status.add(version=7, state=AVAILABLE)
    # model_version_status=1 { version=1: 7, state=2: 30 }
    assert status.SerializeToString() == b"\x0a\x04\x08\x07\x10\x1e"
    assert health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString() == \
        b"\x08\x01"
    listed = health_pb2.HealthListResponse()
    listed.statuses["a"].status = health_pb2.HealthCheckResponse.NOT_SERVING
    assert listed.SerializeToString() == b"\x0a\x07\x0a\x01a\x12\x02\x08\x02"  # statuses=1 {key=1, value=2}


_INDEPENDENT = """
import json, sys
from google.protobuf import json_format
from tensorflow_serving.apis import predict_pb2, get_model_status_pb2, classification_pb2
from grpc.health.v1 import health_pb2
kinds = {"predict": predict_pb2.PredictRequest, "predict_response": predict_pb2.PredictResponse,
         "status": get_model_status_pb2.GetModelStatusResponse, "classify": classification_pb2.ClassificationRequest,
         "health_list": health_pb2.HealthListResponse}
out = {}
for kind, hexed in json.loads(sys.stdin.read()).items():
    msg = kinds[kind].FromString(bytes.fromhex(hexed))
    out[kind] = [msg.SerializeToString(deterministic=True).hex(), json_format.MessageToDict(msg)]
print(json.dumps(out))
"""


def test_project_classes_read_as_independently_compiled_ones(tmp_path: Path) -> None:
    """proto/ compiled again by grpc_tools into a fresh directory, used by another interpreter: it reads the
    project's bytes as the same fields and writes them back byte for byte."""
    pytest.importorskip("grpc_tools")
    import grpc_tools

    protos = sorted(str(p.relative_to(REPO_ROOT / "proto")) for p in (REPO_ROOT / "proto").rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO_ROOT / "proto"), "-I", include,
                    f"--python_out={tmp_path}", *protos], check=True)
    for d in [p for p in tmp_path.rglob("*") if p.is_dir()]:
        (d / "__init__.py").touch()
    predict = predict_pb2.PredictResponse()
    predict.model_spec.name = "m"
    predict.outputs["y"].CopyFrom(tensor(np.arange(6, dtype="<f4").reshape(2, 3)))
    status = get_model_status_pb2.GetModelStatusResponse()
    status.model_version_status.add(version=2, state=LOADING).status.error_message = "loading"
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.version_label = "stable"
    classify.input.example_list.examples.add().features.feature["f"].float_list.value.append(0.5)
    listed = health_pb2.HealthListResponse()
    listed.statuses["m"].status = health_pb2.HealthCheckResponse.SERVING
    ours = {"predict": _hand_written_predict_request(), "predict_response": predict.SerializeToString(),
            "status": status.SerializeToString(), "classify": classify.SerializeToString(),
            "health_list": listed.SerializeToString()}
    done = subprocess.run([sys.executable, "-P", "-c", _INDEPENDENT], input=json.dumps(
        {k: v.hex() for k, v in ours.items()}), capture_output=True, text=True, check=True, cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)})
    theirs = json.loads(done.stdout)
    for kind, message in ours.items():
        assert bytes.fromhex(theirs[kind][0]) == message, kind
    assert theirs["predict"][1]["modelSpec"] == {"name": "m", "version": "3", "signatureName": "sig"}
    assert theirs["status"][1]["modelVersionStatus"][0]["state"] == "LOADING"
    assert theirs["health_list"][1] == {"statuses": {"m": {"status": "SERVING"}}}


# -- what TensorFlow reads otherwise: not modelled --------------------------------------------------------------
#
# TF Serving turns each input into a Tensor with ``Tensor::FromProto`` (tensorflow/core/framework/tensor.cc): a
# non-empty tensor_content wins for every dtype, strings included; typed values beyond the shape are dropped,
# none fill zeros, fewer repeat the last; half_val (int32 on the wire) is copied into 16 bits.


def _predict_with(proto: tensor_pb2.TensorProto, name: str = "x") -> bytes:
    msg = predict_pb2.PredictRequest()
    msg.model_spec.name = "m"
    msg.inputs[name].CopyFrom(proto)
    return bytes(msg.SerializeToString())


def _proto(dtype: int, dims: list[int], **fields: Any) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=d) for d in dims)
    return proto


@pytest.mark.parametrize(
    ("proto", "why"),
    [
        # TF decodes the string-list encoding in tensor_content and never looks at string_val.
        (_proto(types_pb2.DT_STRING, [1], string_val=[b"a"], tensor_content=b"\x01b"), "string tensor in tensor_c"),
        (_proto(types_pb2.DT_HALF, [2], half_val=[0x3C00, 0x13C00]), "beyond 16 bits"),  # TF wraps it to 0x3C00
        (_proto(types_pb2.DT_BFLOAT16, [1], half_val=[-1]), "beyond 16 bits"),
        (_proto(types_pb2.DT_FLOAT, [2], float_val=[1.0, float("nan")]), "NaN in float_val"),
        (_proto(types_pb2.DT_INT32, [2], int_val=[1, 2, 3]), "3 value"),  # TF drops the third
        (_proto(types_pb2.DT_INT32, [2]), "0 value"),  # TF fills zeros
        (_proto(types_pb2.DT_FLOAT, [-1, 0]), "negative dimension"),
    ],
)
def test_tensors_tensorflow_reads_otherwise_are_not_modelled(proto: tensor_pb2.TensorProto, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        tfserving_grpc.decode_request(_predict_with(proto))


def test_tensors_read_as_tensorflow_reads_them() -> None:
    """Fewer typed values than the shape: the last repeats; tensor_content wins over typed values; a NaN in
    tensor_content keeps its bits; names are std::string to TF Serving, NUL and all; a map key repeated on the
    wire is its last entry to protobuf in C++ and Python alike."""
    def one(proto: tensor_pb2.TensorProto, name: str = "x") -> Any:
        (t,) = tfserving_grpc.decode_request(_predict_with(proto, name)).inputs
        return t

    assert np.frombuffer(one(_proto(types_pb2.DT_INT32, [3], int_val=[7, 8])).data, "<i4").tolist() == [7, 8, 8]
    content = np.array([1.5, 2.5], "<f4").tobytes()
    assert one(_proto(types_pb2.DT_FLOAT, [2], float_val=[9.0], tensor_content=content)).data == content
    signalling = np.array([0x7F800001], "<u4").tobytes()
    assert one(_proto(types_pb2.DT_FLOAT, [1], tensor_content=signalling)).data == signalling
    half = one(_proto(types_pb2.DT_HALF, [2], half_val=[0x3C00, 0xFFFF]))
    assert np.frombuffer(half.data, "<u2").tolist() == [0x3C00, 0xFFFF]
    assert one(_proto(types_pb2.DT_FLOAT, [1], float_val=[2.5]), "x\0y").name == "x\0y"
    first = _predict_with(_proto(types_pb2.DT_INT64, [1], int64_val=[1]))
    last = _predict_with(_proto(types_pb2.DT_INT64, [1], int64_val=[2]))
    assert tfserving_grpc.decode_request(first + last) == tfserving_grpc.decode_request(last)


# -- a stand-in TF Serving, gRPC and REST --------------------------------------------------------------------


class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """Predict: y = x, after 50 ms (so concurrent calls overlap), recording each batch size seen."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def Predict(self, request: predict_pb2.PredictRequest, context: Any) -> predict_pb2.PredictResponse:
        if request.model_spec.name == "refuse":
            await context.abort(grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(refuse)")
        self.batches.append(request.inputs["x"].tensor_shape.dim[0].size)
        await asyncio.sleep(0.05)
        out = predict_pb2.PredictResponse()
        out.model_spec.name = request.model_spec.name
        out.model_spec.version.value = 1
        out.model_spec.signature_name = "serving_default"
        out.outputs["y"].CopyFrom(request.inputs["x"])
        return out

    async def Classify(self, request: Any, context: Any) -> classification_pb2.ClassificationResponse:
        out = classification_pb2.ClassificationResponse()
        out.result.classifications.add().classes.add(label="cat", score=0.75)
        return out

    async def Regress(self, request: Any, context: Any) -> regression_pb2.RegressionResponse:
        out = regression_pb2.RegressionResponse()
        out.result.regressions.add(value=2.5)
        return out

    async def MultiInference(self, request: Any, context: Any) -> inference_pb2.MultiInferenceResponse:
        out = inference_pb2.MultiInferenceResponse()
        out.results.add().regression_result.regressions.add(value=1.0)
        return out

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        out = get_model_metadata_pb2.GetModelMetadataResponse()
        out.model_spec.name = request.model_spec.name
        return out

    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        out = get_model_status_pb2.GetModelStatusResponse()
        out.model_version_status.add(version=1, state=AVAILABLE)
        return out

    async def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        return model_management_pb2.ReloadConfigResponse()


class FakeTfServing:
    """gRPC (the servicer) and REST (model status and metadata for the sidecar's monitor and batcher),
    on an event loop of their own in a thread, so blocking test code never stalls them."""

    def __init__(self) -> None:
        self.http_port, self.grpc_port = free_ports(2)
        self.url, self.grpc_url = f"http://{HOST}:{self.http_port}", f"{HOST}:{self.grpc_port}"
        self.state = "AVAILABLE"
        self.servicer = Servicer()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._grpc: Any = None
        self._http: web.AppRunner | None = None

    async def _status(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != "m":
            return web.json_response({"error": "Servable not found"}, status=404)
        return web.json_response({"model_version_status": [{"version": "1", "state": self.state,
                                                            "status": {"error_code": "OK", "error_message": ""}}]})

    async def _metadata(self, request: web.Request) -> web.Response:
        shape = {"dim": [{"size": "-1"}, {"size": "3"}]}
        signature = {"inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": shape}}, "outputs": {}}
        return web.json_response({"metadata": {"signature_def": {"signature_def": {"serving_default": signature}}}})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models/{model}", self._status)
        app.router.add_get("/v1/models/{model}/metadata", self._metadata)
        self._http = web.AppRunner(app)
        await self._http.setup()
        await web.TCPSite(self._http, HOST, self.http_port).start()
        self._grpc = grpc.aio.server()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self.servicer, self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.servicer, self._grpc)
        self._grpc.add_insecure_port(self.grpc_url)
        await self._grpc.start()

    async def _stop(self) -> None:
        await self._grpc.stop(0)
        assert self._http is not None
        await self._http.cleanup()

    def __enter__(self) -> FakeTfServing:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def tf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeTfServing, SidecarProcess]]:
    with FakeTfServing() as fake:
        args = ["--set", "upstream.health_interval=0.25", "--set", "log_level=warning", "--set", "shutdown_delay=0",
                "--set", "upstream.models=m", "--set", f"upstream.grpc_url={fake.grpc_url}",
                "--set", "cache.models=m", "--set", "batch.models=m=8"]
        with SidecarProcess(fake.url, tmp_path_factory.mktemp("tf-grpc"), "tfserving", args) as proc:
            yield fake, proc


def call(url: str, method: str, message: bytes) -> tuple[bytes, dict[str, str]]:
    with grpc.insecure_channel(url) as channel:
        response, rpc = channel.unary_unary(method).with_call(message, timeout=30)
        return response, dict(rpc.initial_metadata())


def test_predict_through_the_stages(tf: tuple[FakeTfServing, SidecarProcess]) -> None:
    fake, proc = tf
    values = np.array([[1.0, 2.0, 3.0]], np.float32) + np.float32(len(fake.servicer.batches))
    message = predict_request(values)
    direct, _ = call(fake.grpc_url, PREDICT, message)
    first, initial = call(proc.grpc_url, PREDICT, message)
    assert first == direct and initial["x-sidecar-cache"] == "miss"
    again, initial = call(proc.grpc_url, PREDICT, message)
    assert initial["x-sidecar-cache"] == "hit"
    # Re-encoded from the cached canonical answer: the same message TF Serving wrote.
    assert predict_pb2.PredictResponse.FromString(again) == predict_pb2.PredictResponse.FromString(direct)
    with grpc.insecure_channel(proc.grpc_url) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(PREDICT)(predict_request(values, "refuse"), timeout=10)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.NOT_FOUND and "Servable not found" in error.details()


def test_batched_grpc_callers_keep_their_types_and_rows(tf: tuple[FakeTfServing, SidecarProcess]) -> None:
    """A batch of TF Serving gRPC callers goes upstream over gRPC (REST would turn FP32 into doubles)."""
    fake, proc = tf
    inputs = [np.array([[i, i + 0.5, -i]], np.float32) + np.float32(1000 + len(fake.servicer.batches))
              for i in range(8)]
    seen = len(fake.servicer.batches)

    def one(values: np.ndarray) -> np.ndarray:
        answer = predict_pb2.PredictResponse.FromString(call(proc.grpc_url, PREDICT, predict_request(values))[0])
        return floats(answer.outputs["y"])

    with concurrent.futures.ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(one, inputs))
    for got, sent in zip(answers, inputs, strict=True):
        assert np.array_equal(got, sent)
    assert max(fake.servicer.batches[seen:]) > 1 and sum(fake.servicer.batches[seen:]) == len(inputs)


def test_other_rpcs_pass_through_raw(tf: tuple[FakeTfServing, SidecarProcess]) -> None:
    fake, proc = tf
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "m"
    calls = {
        "/tensorflow.serving.PredictionService/Classify": classify.SerializeToString(),
        "/tensorflow.serving.PredictionService/Regress": regression_pb2.RegressionRequest().SerializeToString(),
        "/tensorflow.serving.PredictionService/MultiInference": b"",
        "/tensorflow.serving.PredictionService/GetModelMetadata": b"\x0a\x03\x0a\x01m",  # model_spec{name "m"}
        "/tensorflow.serving.ModelService/GetModelStatus": b"\x0a\x03\x0a\x01m",
        "/tensorflow.serving.ModelService/HandleReloadConfigRequest": b"",
    }
    for method, message in calls.items():
        assert call(proc.grpc_url, method, message)[0] == call(fake.grpc_url, method, message)[0], method
    unknown = predict_request(np.ones((1, 3), np.float32)) + b"\x32\x01a"  # client_id: not modelled, forwarded
    before = _metric(proc, 'sidecar_unmodelled_total{protocol="tfserving_grpc"}')
    assert predict_pb2.PredictResponse.FromString(call(proc.grpc_url, PREDICT, unknown)[0]).outputs["y"]
    assert _metric(proc, 'sidecar_unmodelled_total{protocol="tfserving_grpc"}') == before + 1


def test_model_status_is_not_ready_until_warm(tf: tuple[FakeTfServing, SidecarProcess]) -> None:
    fake, proc = tf
    status = "/tensorflow.serving.ModelService/GetModelStatus"

    def shown() -> int:
        answer = get_model_status_pb2.GetModelStatusResponse.FromString(call(proc.grpc_url, status, b"")[0])
        return int(answer.model_version_status[0].state)

    assert shown() == AVAILABLE
    fake.state = "LOADING"  # the REST status the monitor reads; the gRPC servicer still says AVAILABLE
    try:
        wait_until(lambda: shown() == LOADING, 10, "shown as loading")
        assert _health(proc.grpc_url, "m") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        fake.state = "AVAILABLE"
    wait_until(lambda: shown() == AVAILABLE, 30, "available again once warm")
    assert _health(proc.grpc_url, "m") == health_pb2.HealthCheckResponse.SERVING


def _health(url: str, service: str) -> int:
    with grpc.insecure_channel(url) as channel:
        answer = channel.unary_unary("/grpc.health.v1.Health/Check")(
            health_pb2.HealthCheckRequest(service=service).SerializeToString(), timeout=5)
    return int(health_pb2.HealthCheckResponse.FromString(answer).status)


def _metric(proc: SidecarProcess, sample: str) -> float:
    for line in exchange(proc.admin_url, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0

