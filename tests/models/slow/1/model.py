"""OUTPUT0 = INPUT0 (FP32), after sleeping for the request parameter "delay" (seconds, default 0).

Stands for a model server that answers late, to test upstream timeouts. A "delay" that is not a
number gets an error response.
"""

from __future__ import annotations

import json
import time

import triton_python_backend_utils as pb_utils


def _delay(request: pb_utils.InferenceRequest) -> float:
    parameters = json.loads(request.parameters() or "{}")
    return max(0.0, float(parameters.get("delay", 0)))


def _respond(request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
    try:
        delay = _delay(request)
    except (TypeError, ValueError) as error:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad 'delay' parameter: {error}"))
    time.sleep(delay)
    data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
    return pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)])


class TritonPythonModel:
    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        return [_respond(request) for request in requests]
