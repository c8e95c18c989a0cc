"""The recorded top-N as a model server's own warm-up, and TF Serving's warm-up file read back.
Pure functions (no I/O): ``sidecar export-warmup`` and the planner do the reading and writing.

- TF Serving: ``assets.extra/tf_serving_warmup_requests``, a TFRecord of ``PredictionLog``
  (predict, classify and regress logs), at most 1000 records (TF Serving reads no more).
- Triton: ``model_warmup`` entries for config.pbtxt, each input's data in a file of the model's
  ``warmup/`` directory (raw row-major bytes; BYTES elements as <u32 length><bytes>). Triton
  repeats one sample ``batch_size`` times, so a batched request contributes its first row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.message import DecodeError as ProtobufDecodeError

from ..identity import batch_size
from ..protocols import tfserving_rest as rest
from ..protocols.request import (
    InferenceRequest,
    Params,
    Protocol,
    RequestedOutput,
    freeze_params,
    thaw_params,
    unpack_bytes_elements,
)
from ..protocols.rows import tensor_rows
from ..protocols.tftensor import (
    cast,
    example_from_json,
    example_text,
    examples_tensor,
    from_tensor_proto,
    to_tensor_proto,
)
from ..protogen.tensorflow_serving.apis import input_pb2, model_pb2, prediction_log_pb2
from . import tfrecord

MAX_TF_RECORDS = 1000  # TF Serving's own limit on warm-up records

# A signature's inputs: name -> KServe datatype, from the model server's metadata.
Signature = Mapping[str, str]
DEFAULT_SIGNATURE = "serving_default"


@dataclass
class Converted:
    """What an export or import produced, and what it had to leave out (and why)."""

    data: bytes = b""
    requests: list[InferenceRequest] = field(default_factory=list)
    written: int = 0
    skipped: list[str] = field(default_factory=list)


# -- TF Serving ------------------------------------------------------------------------------------


def to_tfserving_warmup(requests: Sequence[InferenceRequest], model: str,
                        signatures: Mapping[str, Signature] | None = None) -> Converted:
    """``signatures`` (by name, when known) name an unnamed REST input and give JSON-typed inputs their real
    type: a warm-up record whose types do not match the signature fails the model's load in TF Serving."""
    records: list[bytes] = []
    out = Converted()
    for i, req in enumerate(requests):
        if len(records) == MAX_TF_RECORDS:
            out.skipped.append(f"requests {i}..{len(requests) - 1}: TF Serving reads at most {MAX_TF_RECORDS}")
            break
        try:
            records.append(prediction_log(req, model, signatures or {}).SerializeToString())
        except ValueError as e:
            out.skipped.append(f"request {i}: {e}")
    out.data, out.written = tfrecord.write_records(records), len(records)
    return out


def prediction_log(req: InferenceRequest, model: str,
                   signatures: Mapping[str, Signature]) -> prediction_log_pb2.PredictionLog:
    params = thaw_params(req.parameters)
    signature = signatures.get(str(params.get(rest.SIGNATURE_PARAM) or DEFAULT_SIGNATURE))
    spec = model_pb2.ModelSpec(name=model, signature_name=str(params.get(rest.SIGNATURE_PARAM, "")))
    if req.version.isdigit():
        spec.version.value = int(req.version)
    elif params.get(rest.LABEL_PARAM):
        spec.version_label = str(params[rest.LABEL_PARAM])
    log = prediction_log_pb2.PredictionLog()
    if req.method in ("classify", "regress"):
        target = log.classify_log.request if req.method == "classify" else log.regress_log.request
        target.model_spec.CopyFrom(spec)
        target.input.CopyFrom(_examples_input(req, params))
        return log
    predict = log.predict_log.request
    predict.model_spec.CopyFrom(spec)
    for t in req.inputs:
        name = t.name or _only_input(signature)
        if signature and name in signature:
            t = cast(t, signature[name])
        predict.inputs[name].CopyFrom(to_tensor_proto(t))
    predict.output_filter.extend(o.name for o in req.outputs)
    return log


def _only_input(signature: Signature | None) -> str:
    if signature and len(signature) == 1:
        return next(iter(signature))
    raise ValueError("an unnamed input (REST 'instances' of bare values) needs the model's signature "
                     "to name it; the model server's metadata was not available")


def _examples_input(req: InferenceRequest, params: dict[str, Any]) -> input_pb2.Input:
    texts = unpack_bytes_elements(req.input(rest.EXAMPLES).data)
    examples = [example_from_json(orjson.loads(t)) for t in texts]
    out = input_pb2.Input()
    if rest.CONTEXT_PARAM in params:
        out.example_list_with_context.examples.extend(examples)
        out.example_list_with_context.context.CopyFrom(example_from_json(orjson.loads(params[rest.CONTEXT_PARAM])))
    else:
        out.example_list.examples.extend(examples)
    return out


def from_tfserving_warmup(blob: bytes, model: str = "") -> Converted:
    """The records as canonical TF Serving REST requests; ``model`` names those whose model_spec has no
    name (TF Serving runs a SavedModel's records against that model whatever they name). Bad framing
    raises ValueError; a record that cannot be read or has no REST equivalent (multi-inference,
    streamed) is skipped, with why."""
    out = Converted()
    for i, raw in enumerate(tfrecord.read_records(blob)):
        try:
            out.requests.append(request_of(prediction_log_pb2.PredictionLog.FromString(raw), model))
        except (ValueError, ProtobufDecodeError) as e:
            out.skipped.append(f"record {i}: {e}")
    return out


def request_of(log: prediction_log_pb2.PredictionLog, model: str = "") -> InferenceRequest:
    kind = log.WhichOneof("log_type")
    if kind == "predict_log":
        predict = log.predict_log.request
        inputs = tuple(from_tensor_proto(n, predict.inputs[n]) for n in sorted(predict.inputs))
        outputs = tuple(RequestedOutput(n) for n in predict.output_filter)
        return _request(predict.model_spec, model, "predict", {}, inputs, outputs,
                        freeze_params({rest.FORMAT_PARAM: rest.COLUMNAR}))
    if kind in ("classify_log", "regress_log"):
        request = log.classify_log.request if kind == "classify_log" else log.regress_log.request
        params: dict[str, Any] = {}
        which = request.input.WhichOneof("kind")
        if which == "example_list_with_context":
            examples = list(request.input.example_list_with_context.examples)
            params[rest.CONTEXT_PARAM] = example_text(request.input.example_list_with_context.context).decode()
        elif which == "example_list":
            examples = list(request.input.example_list.examples)
        else:
            raise ValueError(f"{kind}: no examples")
        if not examples:
            raise ValueError(f"{kind}: no examples")
        method = "classify" if kind == "classify_log" else "regress"
        return _request(request.model_spec, model, method, params, (examples_tensor(examples),), ())
    raise ValueError(f"{kind or 'an empty log'} has no REST equivalent")


def _request(spec: model_pb2.ModelSpec, model: str, method: str, params: dict[str, Any], inputs: tuple[Any, ...],
             outputs: tuple[RequestedOutput, ...], options: Params = ()) -> InferenceRequest:
    if not (spec.name or model):
        raise ValueError("model_spec.name is empty")
    if spec.signature_name:
        params[rest.SIGNATURE_PARAM] = spec.signature_name
    if spec.WhichOneof("version_choice") == "version_label":
        params[rest.LABEL_PARAM] = spec.version_label
    version = str(spec.version.value) if spec.HasField("version") else ""
    return InferenceRequest(Protocol.TFSERVING_REST, spec.name or model, version, method, inputs, outputs,
                            freeze_params(params), options)


# -- Triton ----------------------------------------------------------------------------------------

_TRITON_TYPES = {"BYTES": "TYPE_STRING"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def to_triton_model_warmup(requests: Sequence[InferenceRequest], max_batch: int) -> tuple[str, dict[str, bytes]]:
    """(the ``model_warmup [...]`` text for config.pbtxt, {file name in warmup/: contents})."""
    entries: list[str] = []
    files: dict[str, bytes] = {}
    for i, req in enumerate(requests):
        batch = min(batch_size(req), max_batch) if max_batch > 0 else 1
        inputs = []
        for t in sorted(req.inputs, key=lambda t: t.name):
            if max_batch > 0 and not t.shape:
                raise ValueError(f"request {i}: input {t.name!r} has no batch dimension")
            dims, data = (t.shape[1:], tensor_rows(t)[0] if t.shape[0] else b"") if max_batch > 0 else (t.shape, t.data)
            file = f"recorded_{i}_{_UNSAFE.sub('_', t.name)}"
            files[file] = data
            datatype = _TRITON_TYPES.get(t.datatype, f"TYPE_{t.datatype}")
            inputs.append(
                f"      inputs {{\n        key: {_quote(t.name)}\n        value: {{\n"
                f"          data_type: {datatype}\n          dims: [ {', '.join(map(str, dims))} ]\n"
                f"          input_data_file: {_quote(file)}\n        }}\n      }}\n"
            )
        entries.append(f"    {{\n      name: {_quote(f'recorded_{i}_batch_{batch}')}\n"
                       f"      batch_size: {batch}\n{''.join(inputs)}    }}")
    return "model_warmup [\n" + ",\n".join(entries) + "\n]\n", files


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
