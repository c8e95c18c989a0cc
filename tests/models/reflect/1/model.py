"""OUTPUT0 = INPUT0, OUTPUT1 = INPUT1 (empty when absent), META = the request's parameters as JSON, per row.

The differential tests compare Triton's answer to a call with the sidecar's: whatever Triton read
(input bytes, custom parameters, forwarded headers) is in the answer, so a call the sidecar reads
differently gets a different answer and the test sees it.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def _respond(request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
    first = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
    second = pb_utils.get_input_tensor_by_name(request, "INPUT1")
    rows = first.shape[0]
    other = second.as_numpy() if second is not None else np.zeros((rows, 0), dtype=np.float64)
    parameters = json.loads(request.parameters() or "{}")
    meta = json.dumps(parameters, sort_keys=True).encode()
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("OUTPUT0", first),
        pb_utils.Tensor("OUTPUT1", other),
        pb_utils.Tensor("META", np.array([[meta]] * rows, dtype=np.object_)),
    ])


class TritonPythonModel:
    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        return [_respond(request) for request in requests]
