"""A torch.compile'd MLP that is genuinely cold after every load: OUTPUT0 = MLP(INPUT0), FP32 [b, 64] -> [b, 8].

What makes it cold, and keeps that cold cost as small as a real compile allows:

- ``torch.compile(dynamic=False)``: every batch size is a new static graph, so the first call at
  each batch size runs Dynamo, AOTAutograd and Inductor and builds a C++ kernel with the system
  compiler (about 0.7-1 s here); the very first call also pays Inductor's lazy imports (2-4 s in all).
- A fresh Inductor cache per load: ``TORCHINDUCTOR_CACHE_DIR`` points at a new temporary directory,
  removed again in ``finalize()``, so nothing compiled by an earlier server start is reused. Set
  ``COMPILED_MLP_INDUCTOR_CACHE`` to a directory to keep and reuse a cache instead (a warm disk cache).
- ``cpp.vec_isa_ok = False``: skips Inductor's once-per-process probe builds of four SIMD test
  programs (about 9.5 s on this machine) and emits scalar C++; the matmuls run in ATen either way.
- ``compile_threads = 1``: compiles in this process instead of starting a pool of workers that
  each import torch (the pool doubled the first call here); one intra-op thread, the machine has 2 cores.

Weights are random with a fixed seed, so outputs are deterministic; a row's result does not depend
on the batch it travels in.
"""

from __future__ import annotations

import locale
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

INPUTS, HIDDEN, OUTPUTS = 64, 64, 8
SEED = 0
CACHE_ENV = "COMPILED_MLP_INDUCTOR_CACHE"


def _log(message: str) -> None:
    print(f"compiled_mlp: {message}", flush=True)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        started = time.perf_counter()
        self._own_cache: str | None = None
        cache_dir = os.environ.get(CACHE_ENV)
        if not cache_dir:
            cache_dir = self._own_cache = tempfile.mkdtemp(prefix="compiled_mlp-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # read by Inductor when it first needs it
        # torch needs a UTF-8 locale, which the python-backend stub does not set (docs/architecture.md).
        locale.setlocale(locale.LC_ALL, "C.UTF-8")
        import torch
        import torch._dynamo.config
        import torch._inductor.config

        torch.set_num_threads(1)
        torch._inductor.config.compile_threads = 1
        torch._inductor.config.cpp.vec_isa_ok = False
        torch._dynamo.config.recompile_limit = 64  # one graph per batch size, up to max_batch_size 16
        torch.manual_seed(SEED)
        net = torch.nn.Sequential(
            torch.nn.Linear(INPUTS, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUTPUTS)
        ).eval()
        self._torch = torch
        self._compiled = torch.compile(net, dynamic=False)
        self._seen: set[int] = set()
        _log(f"loaded in {time.perf_counter() - started:.2f} s, inductor cache {cache_dir}")

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
        batch = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
        started = time.perf_counter()
        with self._torch.inference_mode():
            result = self._compiled(self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        output = result.numpy().astype(np.float32, copy=False)
        if batch.shape[0] not in self._seen:
            self._seen.add(batch.shape[0])
            _log(f"first call at batch {batch.shape[0]}: {time.perf_counter() - started:.3f} s")
        return pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", output)])

    def finalize(self) -> None:
        if self._own_cache is not None:
            shutil.rmtree(self._own_cache, ignore_errors=True)
