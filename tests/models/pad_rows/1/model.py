"""CODES[i] = the bytes of row i's TEXT as INT32, zero-padded to the longest TEXT of the request.

Stands for any model that pads its rows to the longest in the batch (tokenizers, sequence outputs):
the shape of one caller's answer depends on what else was in its request.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils


def _respond(request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
    texts = [bytes(t) for t in pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)]
    longest = max((len(t) for t in texts), default=0)
    codes = np.zeros((len(texts), longest), dtype=np.int32)
    for i, text in enumerate(texts):
        codes[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return pb_utils.InferenceResponse([pb_utils.Tensor("CODES", codes)])


class TritonPythonModel:
    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        return [_respond(request) for request in requests]
