"""The gRPC codecs (KServe v2 ModelInfer, TF Serving Predict) as pure functions.

Round trips through the canonical types, equality of HTTP and gRPC forms of one call (the same cache key,
so an answer cached for one protocol serves the other), and what is not modelled. Messages are built with
tritonclient's own request builders where a real client's bytes matter.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import _utils as grpc_utils
from tritonclient.grpc import service_pb2

from sidecar.errors import DecodeError
from sidecar.front.grpc_stream import stream_error, stream_response
from sidecar.identity import cache_key
from sidecar.protocols import kserve_grpc, kserve_http, tfserving_grpc
from sidecar.protocols.request import (
    InferenceRequest,
    InferenceResponse,
    Protocol,
    RequestedOutput,
    Tensor,
    freeze_params,
    thaw_params,
)
from sidecar.protogen.tensorflow_serving.apis import get_model_status_pb2
from tests.strategies import inference_requests, inference_responses, tensors

# -- KServe v2 gRPC ---------------------------------------------------------------------------------------


def _grpc_form(req: InferenceRequest) -> InferenceRequest:
    """What a gRPC caller can say: no per-output binary flag (that is HTTP's)."""
    outputs = tuple(dataclasses.replace(o, binary=None) for o in req.outputs)
    return dataclasses.replace(req, protocol=Protocol.KSERVE_GRPC, outputs=outputs)


def _has_null(params: tuple[tuple[str, str], ...]) -> bool:
    return any(v is None for v in thaw_params(params).values())


@given(inference_requests())
def test_request_round_trip(req: InferenceRequest) -> None:
    if _has_null(req.parameters) or any(_has_null(o.parameters) for o in req.outputs):
        with pytest.raises(ValueError, match="no gRPC InferParameter form"):
            kserve_grpc.encode_request(req)
        return
    decoded = kserve_grpc.decode_request(kserve_grpc.encode_request(req))
    assert decoded == _grpc_form(req)
    assert decoded.id == req.id


@given(inference_responses())
def test_response_round_trip(resp: InferenceResponse) -> None:
    if _has_null(resp.parameters):
        return
    caller = InferenceRequest(Protocol.KSERVE_GRPC, resp.model, id=resp.id)
    decoded = kserve_grpc.decode_response(kserve_grpc.encode_response(caller, resp))
    assert decoded == dataclasses.replace(resp, protocol=Protocol.KSERVE_GRPC, model=resp.model)
    assert decoded.id == resp.id


@given(inference_requests(unique_names=True))
def test_http_and_grpc_forms_of_one_call_share_the_cache_key(req: InferenceRequest) -> None:
    if _has_null(req.parameters) or any(_has_null(o.parameters) for o in req.outputs):
        return
    body, length = kserve_http.encode_request(req, True)
    over_http = kserve_http.decode_request(req.model, req.version, body, length)
    over_grpc = kserve_grpc.decode_request(kserve_grpc.encode_request(req))
    assert over_grpc.protocol is Protocol.KSERVE_GRPC and over_http.protocol is Protocol.KSERVE_HTTP
    assert cache_key(over_grpc, "g") == cache_key(over_http, "g")


def _tritonclient_pair(data: np.ndarray, **kw: object) -> tuple[InferenceRequest, InferenceRequest]:
    """One call as tritonclient.grpc and tritonclient.http send it, decoded by the sidecar's codecs."""
    gin = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    gin.set_data_from_numpy(data)
    hin = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    hin.set_data_from_numpy(data, binary_data=bool(kw.pop("binary", True)))
    gout = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=int(kw.get("class_count", 0)))]
    hout = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True, class_count=int(kw.get("class_count", 0)))]
    params = kw.get("parameters")
    message = grpc_utils._get_inference_request(
        model_name="m", inputs=[gin], model_version="", request_id="r1", outputs=gout, sequence_id=0,
        sequence_start=False, sequence_end=False, priority=int(kw.get("priority", 0)),
        timeout=kw.get("timeout"), parameters=params).SerializeToString()
    body, length = httpclient.InferenceServerClient.generate_request_body(
        [hin], outputs=hout, request_id="r2", priority=int(kw.get("priority", 0)),
        timeout=kw.get("timeout"), parameters=params)
    return kserve_grpc.decode_request(message), kserve_http.decode_request("m", "", body, length)


@pytest.mark.parametrize("kw", [
    {},
    {"binary": False},
    {"parameters": {"flag": True, "count": 3, "label": "x"}},
    {"priority": 2, "timeout": 5000},
    {"class_count": 2},
])
def test_tritonclient_grpc_and_http_calls_of_one_meaning_share_the_key(kw: dict[str, object]) -> None:
    over_grpc, over_http = _tritonclient_pair(np.arange(6, dtype="<f4").reshape(2, 3), **kw)
    assert over_grpc.inputs == over_http.inputs
    assert cache_key(over_grpc, "") == cache_key(over_http, "")
    assert over_grpc.id == "r1"


def test_parameter_types_keep_their_meaning() -> None:
    msg = service_pb2.ModelInferRequest(model_name="m")
    msg.parameters["b"].bool_param = True
    msg.parameters["i"].int64_param = -3
    msg.parameters["s"].string_param = "text"
    msg.parameters["d"].double_param = 1.0
    msg.parameters["priority"].uint64_param = 2**64 - 1
    req = kserve_grpc.decode_request(msg.SerializeToString())
    assert thaw_params(req.parameters) == {"b": True, "i": -3, "s": "text", "d": 1.0}
    assert thaw_params(req.options) == {"priority": 2**64 - 1}  # Triton's own; the model never sees it
    # A double 1.0 and an integer 1 mean different things to Triton, so they stay different calls.
    assert dict(req.parameters)["d"] == "1.0"
    again = kserve_grpc.decode_request(kserve_grpc.encode_request(req))
    assert again == req


def test_typed_contents_equal_raw_contents() -> None:
    values = {"INT8": [-128, 0, 127], "UINT16": [0, 1, 65535], "INT32": [-5, 6, 7], "INT64": [-(2**63), 0, 1],
              "UINT64": [0, 2**64 - 1, 3], "FP32": [0.5, -1.25, 3.0], "FP64": [1e300, -0.0, 2.5],
              "BOOL": [True, False, True], "BYTES": [b"a", b"", b"\xff\x00"]}
    dtypes = {"INT8": "<i1", "UINT16": "<u2", "INT32": "<i4", "INT64": "<i8", "UINT64": "<u8", "FP32": "<f4",
              "FP64": "<f8", "BOOL": "?"}
    fields = {"INT8": "int_contents", "UINT16": "uint_contents", "INT32": "int_contents", "INT64": "int64_contents",
              "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
              "BOOL": "bool_contents", "BYTES": "bytes_contents"}
    for datatype, items in values.items():
        typed = service_pb2.ModelInferRequest(model_name="m")
        t = typed.inputs.add(name="x", datatype=datatype, shape=[3])
        getattr(t.contents, fields[datatype]).extend(items)
        raw = service_pb2.ModelInferRequest(model_name="m")
        raw.inputs.add(name="x", datatype=datatype, shape=[3])
        if datatype == "BYTES":
            raw.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in items))
        else:
            raw.raw_input_contents.append(np.array(items, dtype=dtypes[datatype]).tobytes())
        assert kserve_grpc.decode_request(typed.SerializeToString()) == kserve_grpc.decode_request(
            raw.SerializeToString()), datatype


def _refused(msg: service_pb2.ModelInferRequest, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        kserve_grpc.decode_request(msg.SerializeToString())


def test_what_is_not_modelled_is_refused_by_name() -> None:
    def base() -> service_pb2.ModelInferRequest:
        m = service_pb2.ModelInferRequest(model_name="m")
        m.inputs.add(name="x", datatype="FP32", shape=[2])
        m.raw_input_contents.append(bytes(8))
        return m

    shm = base()
    shm.inputs[0].parameters["shared_memory_region"].string_param = "r"
    _refused(shm, r"inputs\[0\].parameters.shared_memory_region")
    out = base()
    out.outputs.add(name="y").parameters["shared_memory_region"].string_param = "r"
    _refused(out, "shared-memory outputs")
    short = base()
    short.inputs[0].shape[0] = 3
    _refused(short, "shape needs 12")
    half = service_pb2.ModelInferRequest(model_name="m")
    half.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    _refused(half, "FP16 data travels only in raw_input_contents")
    wrong = service_pb2.ModelInferRequest(model_name="m")
    wrong.inputs.add(name="x", datatype="INT32", shape=[1]).contents.fp32_contents.append(1.0)
    _refused(wrong, "fp32_contents set for a INT32 tensor")
    narrow = service_pb2.ModelInferRequest(model_name="m")
    narrow.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    _refused(narrow, r"values must lie in \[-128, 127\]")
    count = base()
    count.raw_input_contents.append(b"")
    _refused(count, "2 entries for 1 inputs")
    nan = base()
    nan.parameters["p"].double_param = float("nan")
    _refused(nan, "parameters.p: a double_param")
    for key, field, value in [("u", "uint64_param", 5), ("priority", "int64_param", -1),
                              ("priority", "string_param", "1"), ("timeout", "uint64_param", 5),
                              ("sequence_id", "uint64_param", 5), ("sequence_start", "int64_param", 1),
                              ("binary_data_output", "bool_param", True)]:
        # Each refused by Triton's gRPC front (or, binary_data_output, read differently from HTTP).
        bad = base()
        setattr(bad.parameters[key], field, value)
        _refused(bad, f"parameters.{key}")
    named = base()
    named.inputs[0].name = "x\0y"  # Triton reads names as C strings: "x"
    _refused(named, "NUL")
    with pytest.raises(DecodeError, match="not a valid ModelInferRequest"):
        kserve_grpc.decode_request(b"\xff\xff\xff")
    unknown = base().SerializeToString() + b"\xf8\x07\x01"  # field 127, varint: no such field
    with pytest.raises(DecodeError, match="unknown"):
        kserve_grpc.decode_request(unknown)


def test_answer_keeps_only_the_requested_outputs_and_the_callers_id() -> None:
    resp = InferenceResponse(Protocol.KSERVE_HTTP, "m", "1", (
        Tensor("a", "FP32", (1,), bytes(4)), Tensor("b", "INT64", (2,), bytes(16))), id="server-id")
    caller = InferenceRequest(Protocol.KSERVE_GRPC, "m", outputs=(RequestedOutput("b"),), id="mine")
    msg = service_pb2.ModelInferResponse.FromString(kserve_grpc.encode_response(caller, resp))
    assert [o.name for o in msg.outputs] == ["b"] and msg.id == "mine" and msg.model_version == "1"
    assert list(msg.raw_output_contents) == [bytes(16)]


def test_stream_responses_read_as_triton_writes_them() -> None:
    answer = service_pb2.ModelInferResponse(model_name="m", id="x").SerializeToString()
    ok = service_pb2.ModelStreamInferResponse.FromString(stream_response(answer))
    assert ok.infer_response.id == "x" and ok.infer_response.parameters["triton_final_response"].bool_param
    failed = service_pb2.ModelStreamInferResponse.FromString(stream_error("bad input", "r7"))
    assert failed.error_message == "bad input" and failed.infer_response.id == "r7"


# -- TF Serving gRPC --------------------------------------------------------------------------------------

_TF_TENSORS = tensors(name=st.text(min_size=1, max_size=6), shape=st.lists(st.integers(0, 3), max_size=3).map(tuple))


@given(st.lists(_TF_TENSORS, max_size=3, unique_by=lambda t: t.name), st.sampled_from(["", "3"]),
       st.sampled_from(["", "serving_default", "other"]), st.sampled_from(["", "stable"]),
       st.lists(st.text(min_size=1, max_size=4), max_size=2))
def test_predict_request_round_trip(inputs: list[Tensor], version: str, signature: str, label: str,
                                    outputs: list[str]) -> None:
    params = {**({"signature_name": signature} if signature else {}),
              **({"label": label} if label and not version else {})}
    req = InferenceRequest(Protocol.TFSERVING_GRPC, "m", version, "predict",
                           tuple(sorted(inputs, key=lambda t: t.name)), tuple(RequestedOutput(o) for o in outputs),
                           freeze_params(params))
    assert tfserving_grpc.decode_request(tfserving_grpc.encode_request(req)) == req


@given(st.lists(_TF_TENSORS, max_size=3, unique_by=lambda t: t.name))
def test_predict_response_round_trip(outputs: list[Tensor]) -> None:
    resp = InferenceResponse(Protocol.TFSERVING_GRPC, "m", "4", tuple(sorted(outputs, key=lambda t: t.name)))
    caller = InferenceRequest(Protocol.TFSERVING_GRPC, "m", method="predict")
    assert tfserving_grpc.decode_response(tfserving_grpc.encode_response(caller, resp)) == resp


def test_predict_unknown_fields_and_types_are_not_modelled() -> None:
    req = InferenceRequest(Protocol.TFSERVING_GRPC, "m", method="predict", inputs=(Tensor("x", "FP32", (1,),
                                                                                          bytes(4)),))
    message = tfserving_grpc.encode_request(req)
    with pytest.raises(DecodeError, match="does not model"):
        tfserving_grpc.decode_request(message + b"\x32\x01a")  # client_id = 6, left out of the subset
    from sidecar.protogen.tensorflow.core.framework import types_pb2
    from sidecar.protogen.tensorflow_serving.apis import predict_pb2

    complex_input = predict_pb2.PredictRequest()
    complex_input.inputs["x"].dtype = types_pb2.DT_COMPLEX64
    with pytest.raises(DecodeError, match="no KServe datatype"):
        tfserving_grpc.decode_request(complex_input.SerializeToString())


def test_model_status_shows_available_as_loading() -> None:
    status = get_model_status_pb2.GetModelStatusResponse()
    status.model_version_status.add(version=1, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    status.model_version_status.add(version=2, state=get_model_status_pb2.ModelVersionStatus.END)
    shown = get_model_status_pb2.GetModelStatusResponse.FromString(
        tfserving_grpc.status_not_ready(status.SerializeToString()))
    assert [s.state for s in shown.model_version_status] == [get_model_status_pb2.ModelVersionStatus.LOADING,
                                                             get_model_status_pb2.ModelVersionStatus.END]
    assert tfserving_grpc.status_not_ready(b"\xff") == b"\xff"


def test_recorded_grpc_calls_replay_in_their_rest_form() -> None:
    """The recorder keeps a gRPC caller's call in its family's HTTP form; it decodes back to the same call."""
    from sidecar.protocols import dispatch, tfserving_rest

    req = InferenceRequest(Protocol.TFSERVING_GRPC, "m", "2", "predict",
                           (Tensor("x", "FP64", (2,), np.array([1.5, 2.5]).tobytes()),))
    target, _headers, body = dispatch.encode_http(req)
    assert target == b"/v1/models/m/versions/2:predict"
    rest = tfserving_rest.decode_request("m", "2", "", "predict", body)
    assert rest.inputs == req.inputs
    assert orjson.loads(body) == {"inputs": {"x": [1.5, 2.5]}}
