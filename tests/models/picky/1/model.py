"""OUTPUT0 = INPUT0 (FP32), unless INPUT0 holds 13: then the whole request gets an error."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

POISON = 13.0


def _respond(request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
    data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
    if (data == POISON).any():
        return pb_utils.InferenceResponse(error=pb_utils.TritonError("poisoned input: 13 is not accepted"))
    return pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)])


class TritonPythonModel:
    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        return [_respond(request) for request in requests]
