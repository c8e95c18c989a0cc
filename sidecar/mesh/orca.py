"""ORCA load reports for Envoy, as pure functions: what to report, and its three encodings.

A request that carries ``endpoint-load-metrics-format: TEXT|JSON|BIN`` gets a report of this pod's
load on its answer. Envoy's client-side weighted round robin weights a host by
``rps_fractional / application_utilization`` (falling back to ``cpu_utilization`` when the
application's is 0, and ignoring a report whose rps or utilization is not positive). So:

- while not warm the utilization is at least 1.0 (fully loaded): a cold or warming pod's weight
  is its small rps over 1, and it gets little traffic;
- when warm it is the calls in flight over ``mesh.capacity``, counting the call being answered
  (so it is never 0, which Envoy would discard).

Encodings, as Envoy's parser (source/common/orca/orca_parser.cc) reads them:

- TEXT: ``endpoint-load-metrics: TEXT key=value,key=value``; keys ``application_utilization``,
  ``rps_fractional``, ``named_metrics.<name>``. ``=`` is the delimiter of the ORCA design and of
  Envoy from 1.33 (and 1.32.x): Envoy 1.31 and 1.32.0 split on ``:`` instead (envoy#37724);
  for those use JSON or BIN.
- JSON: ``endpoint-load-metrics: JSON {...}``, the OrcaLoadReport proto's JSON with its field
  names; Envoy rejects unknown fields.
- BIN: the serialized ``xds.data.orca.v3.OrcaLoadReport``, base64, in ``endpoint-load-metrics-bin``:
  the gRPC header, which every Envoy that parses ORCA reads first (newer ones also accept
  ``endpoint-load-metrics: BIN ...``). The few fields are written by hand (proto3 wire format),
  so no protobuf code is generated for one message.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import orjson

from ..protocols.protowire import double_field, length_field
from ..state import State

FORMAT_HEADER = b"endpoint-load-metrics-format"
REPORT_HEADER = b"endpoint-load-metrics"
BIN_HEADER = b"endpoint-load-metrics-bin"

# OrcaLoadReport field numbers (cncf/xds xds/data/orca/v3/orca_load_report.proto).
_RPS_FRACTIONAL = 6
_NAMED_METRICS = 8
_APPLICATION_UTILIZATION = 9


@dataclass(frozen=True, slots=True)
class LoadReport:
    application_utilization: float
    rps_fractional: float
    named_metrics: tuple[tuple[str, float], ...] = ()


def utilization(state: State, in_flight: int, capacity: int) -> float:
    """Calls in flight over capacity when warm (the answered call counts); at least 1.0 otherwise."""
    load = max(in_flight, 1) / capacity
    return load if state is State.WARM else max(1.0, load)


def warm_capacity(state: State, progress: float) -> float:
    """1 when the pod can take full traffic, the warm-up progress while it cannot, 0 when leaving."""
    if state is State.WARM:
        return 1.0
    if state is State.DRAINING:
        return 0.0
    return progress


def report(state: State, progress: float, in_flight: int, capacity: int, rps: float) -> LoadReport:
    return LoadReport(
        application_utilization=utilization(state, in_flight, capacity),
        rps_fractional=rps,
        named_metrics=(("in_flight", float(in_flight)), ("warm_capacity", warm_capacity(state, progress))),
    )


def encode(load: LoadReport, fmt: bytes) -> tuple[bytes, bytes] | None:
    """The response header (name, value) for the asked format; None for a format we do not speak."""
    kind = fmt.strip().upper()
    if kind == b"TEXT":
        return REPORT_HEADER, b"TEXT " + as_text(load)
    if kind == b"JSON":
        return REPORT_HEADER, b"JSON " + as_json(load)
    if kind == b"BIN":
        return BIN_HEADER, base64.b64encode(as_binary(load))
    return None


def _number(value: float) -> bytes:
    # Six significant digits: plenty for a weight, short on the wire; never NaN or infinite.
    return b"%.6g" % value


def as_text(load: LoadReport) -> bytes:
    pairs = [b"application_utilization=" + _number(load.application_utilization),
             b"rps_fractional=" + _number(load.rps_fractional)]
    pairs.extend(b"named_metrics.%s=%s" % (name.encode("ascii"), _number(value)) for name, value in load.named_metrics)
    return b",".join(pairs)


def as_json(load: LoadReport) -> bytes:
    return orjson.dumps({
        "application_utilization": load.application_utilization,
        "rps_fractional": load.rps_fractional,
        "named_metrics": dict(load.named_metrics),
    })


def as_binary(load: LoadReport) -> bytes:
    """proto3 wire format as protoc's serializer writes it: fields in number order, map entries by
    key, zero fields left out."""
    out = bytearray()
    _double(out, _RPS_FRACTIONAL, load.rps_fractional)
    for name, value in sorted(load.named_metrics):
        # A map entry is a nested message: key = field 1 (string), value = field 2 (double).
        entry = length_field(1, name.encode()) + double_field(2, value)  # a map value is written even when 0
        out += length_field(_NAMED_METRICS, entry)
    _double(out, _APPLICATION_UTILIZATION, load.application_utilization)
    return bytes(out)


def _double(out: bytearray, field: int, value: float) -> None:
    if value:
        out += double_field(field, value)
