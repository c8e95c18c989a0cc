"""Every caller gets what the model server would answer ITS request, whatever callers before it did.

A real Triton that forwards ``x-tenant*`` headers to its models and restricts inference (and its model
repository) to callers holding a key; two sidecars in front, sharing a Redis tier, with the cache and
the batcher on: one told of the restrictions (``restricted_api``), one that learns them from Triton. Each
case is a pair of callers over the sidecar: the first spells a request the way some parser reads
differently (duplicate keys, number spellings, header spellings, parameters Triton refuses...) and
shapes the cache, the second asks; each must get exactly what Triton answers it directly. The model
(``reflect``) answers with the bits of its inputs and the parameters it saw, so any misreading shows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from tests import trust_fuzz
from tests.servers import MODELS_DIR, RedisServer, TritonServer
from tests.sidecar_proc import SidecarProcess
from tests.trust_calls import (
    ADMIN_KEY,
    API_KEY,
    FORWARD_PATTERN,
    GRPC_ADMIN_KEY,
    TRITON_ARGS,
    GrpcCall,
    HttpCall,
    fp32_bytes,
    fp32_text,
    grpc_infer,
    http_binary,
    http_infer,
    same_grpc,
    same_http,
    send_grpc,
    send_http,
    tensor_json,
)

MODELS = ["reflect", "seq_sum", "slow", "picky"]
# Decimal spellings Triton's JSON parser (RapidJSON without full precision) reads one unit in the last
# place off the correctly rounded value, found against this very server: FP64, and FP32 next to a
# rounding boundary between two floats.
FP64_MISREAD = "72494927031935834e-7"
FP32_MISREAD = "1.456185996532440118933493522490607574582"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("trust-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(MODELS_DIR, tmp_path_factory.mktemp("trust-triton"), models=MODELS,
                      extra_args=TRITON_ARGS) as triton:
        yield triton


def _sidecar_args(server: TritonServer, redis: RedisServer, *extra: str) -> list[str]:
    return ["--set", "cache.models=*", "--set", "batch.models=reflect,slow,picky",
            "--set", f"cache.redis={redis.url}", "--set", f"upstream.grpc_url={server.grpc_url}",
            "--set", f"upstream.http_header_forward_pattern={FORWARD_PATTERN}",
            "--set", f"upstream.grpc_header_forward_pattern={FORWARD_PATTERN}",
            "--set", "models.load=off", "--set", "upstream.health_interval=0.25", "--set", "log_level=warning",
            "--set", "shutdown_delay=0", *extra]


@pytest.fixture(scope="module")
def learning(server: TritonServer, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[SidecarProcess]:
    """Not told of Triton's restrictions: it must learn them before it shares any answer."""
    with SidecarProcess(server.url, tmp_path_factory.mktemp("learning"), "triton",
                        _sidecar_args(server, redis)) as proc:
        yield proc


@pytest.fixture(scope="module")
def configured(server: TritonServer, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[SidecarProcess]:
    spec = f"inference:{API_KEY[0]}={API_KEY[1]};model-repository:{ADMIN_KEY[0]}={ADMIN_KEY[1]}"
    with SidecarProcess(server.url, tmp_path_factory.mktemp("configured"), "triton",
                        _sidecar_args(server, redis, "--set", f"restricted_api={spec}")) as proc:
        yield proc


@pytest.fixture(params=["learning", "configured"])
def sidecar(request: pytest.FixtureRequest) -> SidecarProcess:
    proc: SidecarProcess = request.getfixturevalue(request.param)
    return proc


_counter = iter(range(1, 1 << 30))


def fresh(n: int = 2) -> list[float]:
    """Values no other call of the module used: each case starts with nothing cached for it."""
    base = next(_counter) * 16.0 + 0.25
    return [base + i for i in range(n)]


def check_http(server: TritonServer, sidecar: SidecarProcess, *calls: HttpCall) -> None:
    """Each call in order through the sidecar; each answer must be Triton's own answer to that call."""
    for i, call in enumerate(calls):
        got = send_http(sidecar.port, call)
        want = send_http(server.http_port, call)
        result = same_http(got, want)
        assert result.ok, f"caller {i}: {result.why}"


def check_grpc(server: TritonServer, sidecar: SidecarProcess, *calls: HttpCall | GrpcCall) -> None:
    with grpc.insecure_channel(sidecar.grpc_url) as via, grpc.insecure_channel(server.grpc_url) as direct:
        for i, call in enumerate(calls):
            if isinstance(call, HttpCall):
                assert same_http(send_http(sidecar.port, call), send_http(server.http_port, call)).ok, i
                continue
            result = same_grpc(send_grpc(via, call), send_grpc(direct, call))
            assert result.ok, f"caller {i}: {result.why}"


def doc(*tensors: str, extra: str = "") -> str:
    return '{"inputs":[' + ",".join(tensors) + "]" + extra + "}"


def reflect_in(values: list[float]) -> str:
    return tensor_json("INPUT0", "FP32", [1, len(values)], fp32_text(values))


# -- parser differentials over HTTP --------------------------------------------------------------------


def test_a_duplicated_key_never_files_an_answer_under_the_other_value(server: TritonServer,
                                                                      sidecar: SidecarProcess) -> None:
    a, b = fresh(), fresh()
    # Triton reads the first of a duplicated key, a last-wins parser the second.
    top = '{"inputs":[' + reflect_in(a) + '],"inputs":[' + reflect_in(b) + "]}"
    check_http(server, sidecar, http_infer("reflect", top), http_infer("reflect", doc(reflect_in(b))))
    c, d = fresh(), fresh()
    inner = doc(tensor_json("INPUT0", "FP32", [1, 2], fp32_text(c))[:-1] + f',"data":[{fp32_text(d)}]}}')
    check_http(server, sidecar, http_infer("reflect", inner), http_infer("reflect", doc(reflect_in(d))))
    e = fresh()
    params = doc(reflect_in(e), extra=',"parameters":{"p":"first","p":"second"}')
    check_http(server, sidecar, http_infer("reflect", params),
               http_infer("reflect", doc(reflect_in(e), extra=',"parameters":{"p":"second"}')))


def test_numbers_the_server_reads_otherwise_never_meet_exact_callers(server: TritonServer,
                                                                     sidecar: SidecarProcess) -> None:
    a = fresh(1)
    fp64 = float(FP64_MISREAD)
    misread = doc(reflect_in(a), tensor_json("INPUT1", "FP64", [1, 1], FP64_MISREAD))
    exact = http_binary("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes(a)),
                                    ("INPUT1", "FP64", [1, 1], struct.pack("<d", fp64))])
    check_http(server, sidecar, http_infer("reflect", misread), exact)
    near_boundary = doc(tensor_json("INPUT0", "FP32", [1, 1], FP32_MISREAD))
    check_http(server, sidecar, http_infer("reflect", near_boundary),
               http_binary("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes([float(FP32_MISREAD)]))]))
    # A parameter too: a double spelt past RapidJSON's fast path, then the same double over gRPC.
    b = fresh(1)
    spelt = http_infer("reflect", doc(reflect_in(b), extra=f',"parameters":{{"t":{FP64_MISREAD}}}'))
    exact_grpc = grpc_infer("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes(b))], {"t": ("double_param", fp64)})
    check_grpc(server, sidecar, spelt, exact_grpc)


@pytest.mark.parametrize("spelling", ["GZIP", "x-gzip", "gzip "])
def test_an_encoding_the_server_refuses_never_gets_a_cached_answer(server: TritonServer, sidecar: SidecarProcess,
                                                                   spelling: str) -> None:
    a = fresh()
    body = doc(reflect_in(a))
    check_http(server, sidecar, http_infer("reflect", body), http_infer("reflect", body, encoding=spelling))


def test_repeated_content_encoding_is_read_as_the_server_reads_it(server: TritonServer,
                                                                  sidecar: SidecarProcess) -> None:
    a = fresh()
    plain = http_infer("reflect", doc(reflect_in(a)))
    gz = http_infer("reflect", doc(reflect_in(a)), encoding="gzip")
    twice = HttpCall(gz.path, gz.body, (*gz.headers, ("Content-Encoding", "identity")))
    check_http(server, sidecar, plain, twice, gz)


@pytest.mark.parametrize("params", ['{"priority":"high"}', '{"priority":-1}', '{"timeout":"5"}',
                                    '{"binary_data_output":"true"}', '{"triton_x":1}', '{"p":null}',
                                    '{"p":{"q":1}}', '{"sequence_start":1}'])
def test_parameters_the_server_refuses_are_refused_even_after_a_hit(server: TritonServer, sidecar: SidecarProcess,
                                                                   params: str) -> None:
    a = fresh()
    check_http(server, sidecar, http_infer("reflect", doc(reflect_in(a))),
               http_infer("reflect", doc(reflect_in(a), extra=f',"parameters":{params}')))


def test_outputs_come_in_the_models_order_as_triton_lists_them(server: TritonServer,
                                                               sidecar: SidecarProcess) -> None:
    a = fresh()
    first = doc(reflect_in(a), extra=',"outputs":[{"name":"OUTPUT0"},{"name":"META"}]')
    second = doc(reflect_in(a), extra=',"outputs":[{"name":"META"},{"name":"OUTPUT0"}]')
    check_http(server, sidecar, http_infer("reflect", first), http_infer("reflect", second))


# -- inputs outside the body -----------------------------------------------------------------------------


def test_forwarded_headers_are_part_of_the_identity(server: TritonServer, sidecar: SidecarProcess) -> None:
    a = fresh()
    body = doc(reflect_in(a))
    check_http(server, sidecar,
               http_infer("reflect", body, [("x-tenant-id", "acme")]),
               http_infer("reflect", body, [("x-tenant-id", "globex")]),
               http_infer("reflect", body, [("X-Tenant-Id", "acme")]),  # the parameter is named as sent
               http_infer("reflect", body, [("x-tenant-id", "acme"), ("x-tenant-id", "acme")]),
               http_infer("reflect", body))
    b = fresh(1)
    check_grpc(server, sidecar,
               grpc_infer("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes(b))], metadata=[("x-tenant-id", "a")]),
               grpc_infer("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes(b))], metadata=[("x-tenant-id", "b")]),
               http_binary("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes(b))], headers=[("x-tenant-id", "a")]))


def test_a_caller_without_the_key_never_gets_a_keyed_callers_answer(server: TritonServer,
                                                                    sidecar: SidecarProcess) -> None:
    a = fresh()
    body = doc(reflect_in(a))
    keyed = http_infer("reflect", body)
    keyless = http_infer("reflect", body, key=False)
    wrong = http_infer("reflect", body, [(API_KEY[0], "guess")], key=False)
    second_key = HttpCall(keyed.path, keyed.body, ((API_KEY[0], "guess"), *keyed.headers))  # the first counts
    check_http(server, sidecar, keyed, keyless, wrong, second_key, keyed)
    b = fresh(1)
    grpc_keyed = grpc_infer("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes(b))])
    grpc_keyless = grpc_infer("reflect", [("INPUT0", "FP32", [1, 1], fp32_bytes(b))], key=False)
    check_grpc(server, sidecar, grpc_keyed, grpc_keyless, grpc_keyed)


def test_grpc_parameters_are_checked_as_the_grpc_front_checks_them(server: TritonServer,
                                                                   sidecar: SidecarProcess) -> None:
    a = fresh(1)
    tensor = [("INPUT0", "FP32", [1, 1], fp32_bytes(a))]
    check_grpc(server, sidecar,
               grpc_infer("reflect", tensor, {"p": ("int64_param", 5)}),
               grpc_infer("reflect", tensor, {"p": ("uint64_param", 5)}),  # refused by Triton for a model's own
               grpc_infer("reflect", tensor, {"priority": ("int64_param", -1)}),
               grpc_infer("reflect", tensor, {"sequence_id": ("uint64_param", 3)}),
               # Over gRPC binary_data_output reaches the model; over HTTP Triton takes it.
               http_binary("reflect", tensor, params={"binary_data_output": True}),
               grpc_infer("reflect", tensor, {"binary_data_output": ("bool_param", True)}))


# -- ports, shapes, order --------------------------------------------------------------------------------


def test_the_grpc_port_applies_the_restrictions(server: TritonServer, configured: SidecarProcess) -> None:
    index = GrpcCall(b"", (), method="/inference.GRPCInferenceService/RepositoryIndex")
    with grpc.insecure_channel(configured.grpc_url) as via, grpc.insecure_channel(server.grpc_url) as direct:
        refused = send_grpc(via, index)
        assert refused.code is grpc.StatusCode.UNAVAILABLE
        assert same_grpc(refused, send_grpc(direct, index)).ok  # Triton's own words
        keyed = GrpcCall(b"", (GRPC_ADMIN_KEY,), method=index.method)
        assert send_grpc(via, keyed).code is grpc.StatusCode.OK
        load = GrpcCall(service_pb2.RepositoryModelLoadRequest(model_name="reflect").SerializeToString(), (),
                        method="/inference.GRPCInferenceService/RepositoryModelLoad")
        assert send_grpc(via, load).code is grpc.StatusCode.UNAVAILABLE


def test_shapes_that_would_crash_the_server_are_refused_on_every_port(server: TritonServer,
                                                                      sidecar: SidecarProcess) -> None:
    huge = doc(tensor_json("INPUT0", "FP32", [18446744073709551615], ""))
    answer = send_http(sidecar.port, http_infer("reflect", huge))
    assert answer.status == 400 and b"shape" in answer.body
    wraps = grpc_infer("reflect", [("INPUT0", "FP32", [1, 2**62 + 2], bytes(8))])
    negative = grpc_infer("reflect", [("INPUT0", "FP32", [-2, -2], bytes(16))])
    with grpc.insecure_channel(sidecar.grpc_url) as via:
        for call in (wraps, negative):
            result = send_grpc(via, call)
            assert result.code is grpc.StatusCode.INVALID_ARGUMENT and "shape" in result.details
    a = fresh()
    check_http(server, sidecar, http_infer("reflect", doc(reflect_in(a))))  # and the model still answers


def test_a_stream_keeps_each_sequence_in_order(server: TritonServer, sidecar: SidecarProcess) -> None:
    """ModelStreamInfer: a sequence model's calls reach it in the order sent, so its sums are right."""
    sequences = {101 + i: list(range(1, 16)) for i in range(3)}
    messages = []
    for step in range(15):
        for corrid, values in sequences.items():
            msg = service_pb2.ModelInferRequest(model_name="seq_sum", id=f"{corrid}-{step}")
            msg.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 1])
            msg.raw_input_contents.append(struct.pack("<i", values[step]))
            msg.parameters["sequence_id"].int64_param = corrid
            msg.parameters["sequence_start"].bool_param = step == 0
            msg.parameters["sequence_end"].bool_param = step == 14
            messages.append(msg.SerializeToString())
    with grpc.insecure_channel(sidecar.grpc_url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        responses = list(stream(iter(messages), metadata=[("triton-grpc-protocol-x-api-key", "k3y")], timeout=60))
    sums: dict[str, int] = {}
    for raw in responses:
        response = service_pb2.ModelStreamInferResponse.FromString(raw)
        assert not response.error_message, response.error_message
        infer = response.infer_response
        sums[infer.id] = struct.unpack("<i", infer.raw_output_contents[0])[0]
    for corrid, values in sequences.items():
        assert [sums[f"{corrid}-{s}"] for s in range(15)] == list(np.cumsum(values))


# -- one caller's trouble --------------------------------------------------------------------------------


def test_a_short_deadline_fails_only_its_own_caller(server: TritonServer, sidecar: SidecarProcess) -> None:
    a = fresh(1)
    tensor = [("INPUT0", "FP32", [1, 1], fp32_bytes(a))]
    params = {"delay": ("string_param", "1.0")}
    hasty = grpc_infer("slow", tensor, params, timeout=0.3)
    patient = grpc_infer("slow", tensor, params, timeout=20)
    with grpc.insecure_channel(sidecar.grpc_url) as via, concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(send_grpc, via, hasty)
        second = pool.submit(send_grpc, via, patient)
        assert first.result().code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert second.result().code is grpc.StatusCode.OK
    with grpc.insecure_channel(server.grpc_url) as direct:
        assert same_grpc(second.result(), send_grpc(direct, patient)).ok


def test_coalesced_callers_never_receive_another_callers_error(server: TritonServer,
                                                                sidecar: SidecarProcess) -> None:
    """``picky`` refuses the value 13; each caller must get Triton's refusal of its own request."""
    calls = [http_infer("picky", doc(tensor_json("INPUT0", "FP32", [1, 1], "13")).replace(
        '{"inputs"', f'{{"id":"caller-{i}","parameters":{{"round":{i % 2}}},"inputs"', 1)) for i in range(6)]

    async def all_at_once() -> list[object]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(None, send_http, sidecar.port, c) for c in calls))

    answers = asyncio.run(all_at_once())
    for call, got in zip(calls, answers, strict=True):
        result = same_http(got, send_http(server.http_port, call))  # type: ignore[arg-type]
        assert result.ok, result.why


# -- the stateful differential fuzz ----------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("TRUST_FUZZ_EXAMPLES", "40"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize="TRUST_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
@given(steps=st.lists(st.lists(trust_fuzz.calls(), min_size=1, max_size=5), min_size=1, max_size=4))
def test_every_caller_gets_the_servers_answer_to_its_own_request(server: TritonServer, sidecar: SidecarProcess,
                                                                 steps: list[list[HttpCall | GrpcCall]]) -> None:
    """Sequences of callers, each step's calls at once (so they coalesce and batch), through a sidecar with
    the cache, the batcher and the Redis tier on: every answer is Triton's own answer to that caller's
    request, every refusal Triton's."""
    with grpc.insecure_channel(sidecar.grpc_url) as via, grpc.insecure_channel(server.grpc_url) as direct, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        def through(call: HttpCall | GrpcCall) -> object:
            return send_http(sidecar.port, call) if isinstance(call, HttpCall) else send_grpc(via, call)

        for step in steps:
            answers = list(pool.map(through, step))
            for call, got in zip(step, answers, strict=True):
                if isinstance(call, HttpCall):
                    result = same_http(got, send_http(server.http_port, call))  # type: ignore[arg-type]
                else:
                    result = same_grpc(got, send_grpc(direct, call))  # type: ignore[arg-type]
                assert result.ok, f"{call!r}: {result.why}"
