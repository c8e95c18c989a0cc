"""Request identity keys: equal calls share a key whatever their wire form; different calls do not."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from sidecar.identity import batch_size, cache_key, request_key, shape_signature
from sidecar.protocols import kserve_http
from sidecar.protocols.request import InferenceRequest, Protocol, Tensor, freeze_params
from tests.strategies import inference_requests


@given(inference_requests(unique_names=True))
def test_key_ignores_wire_form(req: InferenceRequest) -> None:
    """JSON and binary encodings of one request decode to the same key."""
    keys = set()
    for binary in (False, True):
        try:
            body, header_length = kserve_http.encode_request(req, binary)
        except ValueError:
            return
        keys.add(request_key(kserve_http.decode_request(req.model, req.version, body, header_length)))
    assert keys == {request_key(req)}


@given(inference_requests(unique_names=True))
def test_key_ignores_id_and_options(req: InferenceRequest) -> None:
    """Options are what the server consumes (wire form, scheduling): the model never sees them."""
    options = freeze_params({"binary_data_output": True, "priority": 3, "timeout": 100})
    other = dataclasses.replace(req, id="other-id", options=options)
    assert request_key(other) == request_key(req)
    assert cache_key(other, "g") == cache_key(req, "g")


@given(inference_requests(unique_names=True), st.sampled_from(["binary_data_output", "priority", "headers"]))
def test_a_parameter_the_model_sees_is_identity_whatever_its_name(req: InferenceRequest, name: str) -> None:
    """Over gRPC, "binary_data_output" reaches the model as its own parameter: canonical parameters are
    exactly what the model sees, so each one changes the key."""
    params = tuple(p for p in req.parameters if p[0] != name)
    plain = dataclasses.replace(req, parameters=params)
    marked = dataclasses.replace(req, parameters=tuple(sorted((*params, (name, "true")))))
    assert request_key(plain) != request_key(marked)


@given(inference_requests(unique_names=True), st.binary(min_size=1, max_size=8))
def test_key_changes_with_data(req: InferenceRequest, extra: bytes) -> None:
    t = Tensor("__extra__", "UINT8", (len(extra),), extra)
    changed = dataclasses.replace(req, inputs=(*req.inputs, t))
    assert request_key(changed) != request_key(req)
    assert request_key(dataclasses.replace(req, model=req.model + "x")) != request_key(req)


def test_shape_signature_and_batch() -> None:
    req = InferenceRequest(Protocol.KSERVE_HTTP, "m", inputs=(
        Tensor("b", "INT64", (4,), bytes(32)), Tensor("a", "FP32", (4, 2), bytes(32))))
    assert shape_signature(req) == "a:FP32[4,2];b:INT64[4]"
    assert batch_size(req) == 4
    assert batch_size(InferenceRequest(Protocol.KSERVE_HTTP, "m")) == 1
