"""Warm-up files for the model servers themselves: TFRecord framing, PredictionLog, Triton model_warmup.

Pure functions, so no server runs here; tests/test_warmup.py loads a Triton export in a real Triton.
(TF Serving's binary cannot be installed on this machine: its file is checked against TF's own
framing rules and the project's PredictionLog classes, which a separate test proves wire-compatible.)
"""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.protocols import kserve_http, tfserving_rest
from sidecar.protocols.request import InferenceRequest, Protocol, Tensor, pack_bytes_elements, thaw_params
from sidecar.protocols.tftensor import from_tensor_proto, to_tensor_proto
from sidecar.protogen.tensorflow.core.framework import tensor_pb2, types_pb2
from sidecar.protogen.tensorflow_serving.apis import prediction_log_pb2
from sidecar.warmup import tfrecord
from sidecar.warmup.export import from_tfserving_warmup, to_tfserving_warmup, to_triton_model_warmup
from tests.strategies import tensors


def test_crc32c_matches_the_standard_check_values() -> None:
    # RFC 3720 B.4 and the CRC catalogue's check value for CRC-32C.
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA
    assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_records_round_trip(records: list[bytes]) -> None:
    blob = tfrecord.write_records(records)
    assert list(tfrecord.read_records(blob)) == records
    assert len(blob) == sum(16 + len(r) for r in records)


@given(st.binary(min_size=1, max_size=64), st.data())
def test_any_corruption_is_refused(record: bytes, data: st.DataObject) -> None:
    blob = bytearray(tfrecord.write_records([record]))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ValueError, match="record 0"):
        list(tfrecord.read_records(bytes(blob)))
    with pytest.raises(ValueError, match="truncated"):
        list(tfrecord.read_records(tfrecord.write_records([record])[:-1]))


@given(tensors(shape=st.lists(st.integers(0, 3), max_size=3).map(tuple)))
def test_tensor_proto_round_trip(t: Tensor) -> None:
    wire = to_tensor_proto(t).SerializeToString()
    assert from_tensor_proto(t.name, tensor_pb2.TensorProto.FromString(wire)) == t


def test_tensor_proto_typed_values_fill_the_shape_with_the_last_one() -> None:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.5, 2.5])
    proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=d) for d in (2, 2))
    t = from_tensor_proto("x", proto)
    assert np.frombuffer(t.data, "<f4").tolist() == [1.5, 2.5, 2.5, 2.5]
    with pytest.raises(ValueError, match=r"'y'.*3 value"):
        from_tensor_proto("y", tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, int_val=[1, 2, 3]))
    with pytest.raises(ValueError, match="no KServe datatype"):
        from_tensor_proto("z", tensor_pb2.TensorProto(dtype=types_pb2.DT_COMPLEX64))


def kserve_request(batch: int) -> InferenceRequest:
    rows = np.arange(batch * 3, dtype="<f4").reshape(batch, 3)
    body = orjson.dumps({"inputs": [
        {"name": "INPUT0", "shape": [batch, 3], "datatype": "FP32", "data": rows.ravel().tolist()},
        {"name": "TEXT", "shape": [batch], "datatype": "BYTES", "data": [f"row {i}" for i in range(batch)]},
    ]})
    return kserve_http.decode_request("m", "", body, None)


def test_tfserving_export_is_a_tfrecord_of_prediction_logs() -> None:
    requests = [kserve_request(1), kserve_request(4)]
    exported = to_tfserving_warmup(requests, "m")
    assert exported.written == 2 and not exported.skipped
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in tfrecord.read_records(exported.data)]
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log", "predict_log"]
    predict = logs[1].predict_log.request
    assert predict.model_spec.name == "m"
    assert predict.inputs["INPUT0"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in predict.inputs["INPUT0"].tensor_shape.dim] == [4, 3]
    assert list(predict.inputs["TEXT"].string_val) == [b"row 0", b"row 1", b"row 2", b"row 3"]
    # Read back, the same tensors (as TF Serving REST requests: the file is TF Serving's).
    back = from_tfserving_warmup(exported.data)
    assert [r.inputs for r in back.requests] == [tuple(sorted(r.inputs, key=lambda t: t.name)) for r in requests]
    assert all(r.protocol is Protocol.TFSERVING_REST and r.method == "predict" for r in back.requests)


def test_tfserving_export_names_and_types_rest_inputs_from_the_signature() -> None:
    # Bare row-format instances: JSON gives neither a name nor a float width.
    req = tfserving_rest.decode_request("m", "3", "", "predict", b'{"instances": [[1, 2.5], [3, 4]]}')
    assert req.inputs[0].name == "" and req.inputs[0].datatype == "FP64"
    assert to_tfserving_warmup([req], "m").skipped[0].startswith("request 0: an unnamed input")
    exported = to_tfserving_warmup([req], "m", {"serving_default": {"x": "FP32"}})
    (record,) = tfrecord.read_records(exported.data)
    predict = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
    assert predict.model_spec.version.value == 3
    assert predict.inputs["x"].dtype == types_pb2.DT_FLOAT
    assert np.frombuffer(predict.inputs["x"].tensor_content, "<f4").tolist() == [1, 2.5, 3, 4]


@pytest.mark.parametrize("method", ["classify", "regress"])
def test_classify_and_regress_round_trip_with_context(method: str) -> None:
    body = orjson.dumps({"signature_name": "sig", "context": {"country": "fr", "weights": [0.5, 1.5]},
                         "examples": [{"age": 3, "name": "a"}, {"age": [4, 5], "blob": {"b64": "/w=="}}]})
    req = tfserving_rest.decode_request("m", "", "stable", method, body)
    exported = to_tfserving_warmup([req], "m")
    (record,) = tfrecord.read_records(exported.data)
    log = prediction_log_pb2.PredictionLog.FromString(record)
    assert log.WhichOneof("log_type") == f"{method}_log"
    (back,) = from_tfserving_warmup(exported.data).requests
    # Scalars come back as one-element lists: the same tf.Example, so the same request TF Serving sees.
    expect = tfserving_rest.decode_request("m", "", "stable", method, orjson.dumps({
        "signature_name": "sig", "context": {"country": ["fr"], "weights": [0.5, 1.5]},
        "examples": [{"age": [3], "name": ["a"]}, {"age": [4, 5], "blob": [{"b64": "/w=="}]}]}))
    assert back == expect
    assert thaw_params(back.parameters)["label"] == "stable"
    assert tfserving_rest.encode_request(back)  # replayable as it is


def test_unsupported_records_are_skipped_with_the_reason() -> None:
    good = to_tfserving_warmup([kserve_request(2)], "m").data
    multi = prediction_log_pb2.PredictionLog()
    multi.multi_inference_log.SetInParent()
    blob = good + tfrecord.write_records([multi.SerializeToString(), b"\x0a\xff"])
    imported = from_tfserving_warmup(blob)
    assert len(imported.requests) == 1
    assert imported.skipped[0].startswith("record 1: multi_inference_log has no REST equivalent")
    assert imported.skipped[1].startswith("record 2:")


def test_at_most_a_thousand_records() -> None:
    exported = to_tfserving_warmup([kserve_request(1)] * 1001, "m")
    assert exported.written == 1000 and "at most 1000" in exported.skipped[0]


def test_triton_model_warmup_takes_the_first_row_and_the_batch_size() -> None:
    snippet, files = to_triton_model_warmup([kserve_request(4), kserve_request(1)], max_batch=2)
    assert snippet.startswith("model_warmup [\n") and snippet.count("batch_size:") == 2
    assert 'name: "recorded_0_batch_2"' in snippet and "batch_size: 2" in snippet  # capped at max_batch
    assert "data_type: TYPE_FP32\n          dims: [ 3 ]" in snippet
    assert "data_type: TYPE_STRING\n          dims: [  ]" in snippet
    assert files["recorded_0_INPUT0"] == struct.pack("<3f", 0, 1, 2)
    assert files["recorded_0_TEXT"] == pack_bytes_elements([b"row 0"])
    unbatched, files = to_triton_model_warmup([kserve_request(2)], max_batch=0)
    assert "batch_size: 1" in unbatched and "dims: [ 2, 3 ]" in unbatched
    assert len(files["recorded_0_INPUT0"]) == 24
