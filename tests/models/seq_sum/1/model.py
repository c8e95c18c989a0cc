"""OUTPUT0 = the running sum of INPUT0 within a sequence (Triton's sequence batcher: START and CORRID)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.sums: dict[int, int] = {}

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().ravel()[0])
            start = int(pb_utils.get_input_tensor_by_name(request, "START").as_numpy().ravel()[0])
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().ravel()[0])
            total = (0 if start else self.sums.get(corrid, 0)) + value
            self.sums[corrid] = total
            output = pb_utils.Tensor("OUTPUT0", np.array([[total]], dtype=np.int32))
            responses.append(pb_utils.InferenceResponse([output]))
        return responses
