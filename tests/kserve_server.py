"""A real KServe ModelServer standing in for TF Serving's REST API in tests.

KServe's v1 protocol is TF Serving's row format: ``POST /v1/models/tfmodel:predict`` with
``{"instances": [...]}`` answers ``{"predictions": [...]}``. The model doubles every number, at any
nesting depth, so answers are deterministic and differ from the request. The columnar form
``{"inputs": ...}`` (one tensor or a dict of named ones) answers ``{"outputs": ...}`` the same way.
Anything else (a string, a missing ``instances``) raises ``InvalidInput``, which KServe answers with
400 ``{"error": "..."}``. KServe parses the body as JSON only when the content type is JSON (or
absent); like TF Serving, this model parses any other body as JSON too.

Run with the KServe venv's interpreter; KServe's own flags apply, e.g.::

    .venv-kserve/bin/python tests/kserve_server.py --http_port 8501 --enable_grpc false
"""

from __future__ import annotations

import json
from typing import Any

import kserve
from kserve.errors import InvalidInput

MODEL_NAME = "tfmodel"

Json = Any


def double(value: Json, where: str) -> Json:
    """Doubles every number in a (nested) list; rejects anything else with InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise InvalidInput(f"{where}: expected a number or a list of numbers, got {type(value).__name__}")
    if isinstance(value, list):
        return [double(item, f"{where}[{index}]") for index, item in enumerate(value)]
    return value * 2


def parse_body(payload: Json) -> dict[str, Json]:
    if isinstance(payload, (bytes, str)):
        try:
            payload = json.loads(payload)
        except ValueError as error:
            raise InvalidInput(f"Unrecognized request format: {error}") from error
    if not isinstance(payload, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(payload).__name__}")
    return payload


def predict_columns(inputs: Json) -> Json:
    """TF Serving's columnar form: one tensor, or a dict of named tensors."""
    if isinstance(inputs, dict):
        return {name: double(value, f"inputs[{name!r}]") for name, value in inputs.items()}
    return double(inputs, "inputs")


def predict_rows(instances: Json) -> list[Json]:
    if not isinstance(instances, list):
        raise InvalidInput(f"'instances' must be a list, got {type(instances).__name__}")
    return [double(instance, f"instances[{index}]") for index, instance in enumerate(instances)]


class DoublingModel(kserve.Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.load()

    def load(self) -> bool:
        self.ready = True
        return self.ready

    async def predict(
        self,
        payload: Json,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Json]:
        payload = parse_body(payload)
        if "instances" in payload:
            return {"predictions": predict_rows(payload["instances"])}
        if "inputs" in payload:
            return {"outputs": predict_columns(payload["inputs"])}
        raise InvalidInput("request body must contain 'instances' or 'inputs'")


def main() -> None:
    kserve.ModelServer().start([DoublingModel(MODEL_NAME)])


if __name__ == "__main__":
    main()
