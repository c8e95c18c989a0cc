"""The data port as strict as the proxies people trust: nothing a client sends rewrites the upstream
request or reaches another caller; decisions on the raw path; Expect, HEAD, compression and calls
the codecs cannot model behave as against the model server; the sidecar's own limits are bounded and
clear. Against a scripted upstream (which records exactly what arrives) and the real Triton."""

from __future__ import annotations

import concurrent.futures
import gzip
import re
import socket
import statistics
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from tests.fake_upstream import FakeUpstream
from tests.rawhttp import RawClient, exchange_raw
from tests.servers import TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess
from tests.wire import exchange

JSON = {"Content-Type": "application/json"}
INFER = "/v2/models/identity_fp32/infer"


def infer_body(values: list[float]) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, len(values)], "datatype": "FP32",
                                     "data": values}]})


def metric(sidecar: SidecarProcess, name: str) -> float:
    text = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeUpstream, SidecarProcess]]:
    with FakeUpstream() as upstream, SidecarProcess(upstream.url, tmp_path_factory.mktemp("fake"), "triton") as proc:
        yield upstream, proc


# -- 1. nothing a client sends rewrites the upstream request ------------------------------------------


def test_percent_encoded_crlf_is_forwarded_exactly_as_received(fake: tuple[FakeUpstream, SidecarProcess]) -> None:
    upstream, proc = fake
    target = b"/v2/x%0D%0AInjected:%20yes?q=%0d%0a%00"
    answer = exchange_raw(proc.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 200
    seen = wait_until(lambda: upstream.requests_for(b"/v2/x"), 5, "the request upstream")[-1]
    request_line, *header_lines = seen.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert request_line == b"GET " + target + b" HTTP/1.1"
    assert not any(line.lower().startswith(b"injected") for line in header_lines)


@pytest.mark.parametrize("raw", [
    b"GET /v2/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ab HTTP/1.1\r\nHost: x\r\nX-A: 1\x002\r\n\r\n",
    b"GET /v2/ab HTTP/1.1\r\nHost: x\r\nX-A: 1\r2\r\n\r\n",
    b"GET /v2/ab HTTP/1.1\r\nHost: x\r\nX\x01A: 12\r\n\r\n",
    b"GET /v2/ab#frag HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ab HTTP/1.1\nHost: x\n\n",
    b"POST /v2/ab HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v2/ab HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
])
def test_control_characters_and_ambiguous_framing_are_refused_before_going_upstream(
        fake: tuple[FakeUpstream, SidecarProcess], raw: bytes) -> None:
    upstream, proc = fake
    before = len(upstream.received)
    answer = exchange_raw(proc.port, raw)
    assert answer.status == 400
    assert answer.header(b"Content-Type") == b"application/json"
    assert "error" in orjson.loads(answer.body)
    assert len(upstream.received) == before


def test_a_smuggled_second_request_never_answers_the_next_caller(fake: tuple[FakeUpstream, SidecarProcess]) -> None:
    """CL+TE desync: refused and closed, so nothing after it is read as a request of its own."""
    upstream, proc = fake
    before = len(upstream.received)
    smuggled = b"GET /v2/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    with RawClient(proc.port) as client:
        client.send(b"POST /v2/ab HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n"
                    b"0\r\n\r\n%s" % (5 + len(smuggled), smuggled))
        assert client.answer().status == 400
        assert client.closed_by_peer()
    assert not upstream.requests_for(b"/v2/smuggled")
    assert len(upstream.received) == before


# -- one view of the path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warming_sidecar(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """A sidecar that stays WARMING: its only seed call always fails and warm-up must complete."""
    work = tmp_path_factory.mktemp("warming")
    seeds = work / "seeds" / "identity_fp32"
    seeds.mkdir(parents=True)
    (seeds / "bad.json").write_bytes(orjson.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
         "outputs": [{"name": "NO_SUCH_OUTPUT"}]}))
    args = ["--set", f"warmup.seeds={work / 'seeds'}", "--set", "warmup.require_complete=true",
            "--set", "warmup.retry_interval=0.2", "--set", "gate.policy=reject"]
    with SidecarProcess(triton.url, work, "triton", args, wait="listening") as proc:
        wait_until(lambda: orjson.loads(exchange(proc.admin_url, "GET", "/status?format=json").body)["state"]
                   == "warming", 30, "state warming")
        yield proc


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v2/health/./ready"),
    ("GET", "/v2/health/%72eady"),
    ("GET", "/v2/models/identity_fp32/./ready"),
    ("POST", "/v2/models/identity_fp32/../identity_fp32/infer"),
    ("POST", "/v2/models/identity_fp32/infer/."),
])
def test_every_decision_is_taken_on_the_path_the_model_server_receives(
        triton: TritonServer, warming_sidecar: SidecarProcess, method: str, path: str) -> None:
    """While warming (reject policy), odd spellings of readiness and inference paths get exactly what
    Triton answers to those raw paths: no readiness leak, no gate bypass into a real inference."""
    body = infer_body([1.0]) if method == "POST" else None
    direct = exchange(triton.url, method, path, body, JSON if body else None)
    proxied = exchange(warming_sidecar.url, method, path, body, JSON if body else None)
    assert (proxied.status, proxied.body) == (direct.status, direct.body)
    assert proxied.status != 200
    # The canonical spellings are the sidecar's to answer while warming.
    assert exchange(warming_sidecar.url, "GET", "/v2/health/ready").status == 400
    assert exchange(warming_sidecar.url, "POST", INFER, infer_body([1.0]), JSON).status == 503


def test_a_failing_required_warm_up_is_retried_with_backoff(warming_sidecar: SidecarProcess) -> None:
    def attempts() -> int:
        status = orjson.loads(exchange(warming_sidecar.admin_url, "GET", "/status?format=json").body)
        found = re.search(r"attempt (\d+)", status["reason"])
        return int(found.group(1)) if found else 0

    first = wait_until(attempts, 20, "a failed attempt reported")
    assert wait_until(lambda: attempts() > first, 20, "another attempt")
    assert exchange(warming_sidecar.admin_url, "GET", "/readyz").status == 503


# -- 2. transparent ------------------------------------------------------------------------------------


def test_expect_100_continue_is_answered_at_once(sidecar: SidecarProcess) -> None:
    body = infer_body([1.0, 2.0])
    with RawClient(sidecar.port) as client:
        client.send(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                    b"Content-Length: %d\r\n\r\n" % (INFER.encode(), len(body)))
        started = time.monotonic()
        assert client.interim(1.0).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert time.monotonic() - started < 0.5
        client.send(body)
        answer = client.answer()
    assert answer.status == 200
    assert orjson.loads(answer.body)["outputs"][0]["data"] == [1.0, 2.0]


def test_head_behaves_as_on_the_model_server_and_the_connection_stays_usable(
        triton: TritonServer, sidecar: SidecarProcess) -> None:
    for path in ("/v2/health/ready", "/v2/models/identity_fp32", "/v2"):
        with RawClient(triton.http_port) as direct_client:
            direct_client.send(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            direct = direct_client.answer(head_request=True)
        with RawClient(sidecar.port) as client:
            client.send(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            proxied = client.answer(head_request=True)
            assert (proxied.status, proxied.header(b"Content-Length")) == (direct.status,
                                                                           direct.header(b"Content-Length"))
            assert proxied.body == b""
            client.send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.answer().status == 200  # no stray body bytes were left on the connection


def test_no_header_the_model_server_did_not_send(triton: TritonServer, sidecar: SidecarProcess) -> None:
    for method, path, body in [("GET", "/v2/health/live", None), ("POST", INFER, infer_body([1.0])),
                               ("GET", "/v2/models/identity_fp32", None)]:
        direct = exchange(triton.url, method, path, body, JSON if body else None)
        proxied = exchange(sidecar.url, method, path, body, JSON if body else None)
        added = {k.lower() for k, _ in proxied.headers} - {k.lower() for k, _ in direct.headers}
        assert added <= {"x-request-id", "x-sidecar-state", "x-sidecar-cache"}, added
        assert proxied.header("Server") is None and proxied.header("Date") is None


@pytest.mark.parametrize(("request_algorithm", "response_algorithm"), [("gzip", "deflate"), ("deflate", "gzip")])
def test_compressed_calls_give_exactly_the_direct_results(triton: TritonServer, sidecar: SidecarProcess,
                                                          request_algorithm: str, response_algorithm: str) -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    results = []
    for url in (triton.url, sidecar.url):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        inp.set_data_from_numpy(data, binary_data=request_algorithm == "gzip")
        result = client.infer("identity_fp32", [inp], request_compression_algorithm=request_algorithm,
                              response_compression_algorithm=response_algorithm)
        results.append(result.as_numpy("OUTPUT0"))
        client.close()
    np.testing.assert_array_equal(results[0], data)
    np.testing.assert_array_equal(results[1], data)


def test_compressed_bodies_travel_unchanged_and_are_modelled(sidecar: SidecarProcess) -> None:
    before = metric(sidecar, "sidecar_unmodelled_total")
    for encoding, packed in (("gzip", gzip.compress(infer_body([3.0]))),
                             ("deflate", zlib.compress(infer_body([3.0])))):
        answer = exchange(sidecar.url, "POST", INFER, packed, {**JSON, "Content-Encoding": encoding})
        assert answer.status == 200, answer.body
        assert orjson.loads(answer.body)["outputs"][0]["data"] == [3.0]
    assert metric(sidecar, "sidecar_unmodelled_total") == before


@pytest.mark.parametrize("case", ["shared-memory", "unknown-field", "odd-header-length", "long-header-length"])
def test_calls_the_codecs_cannot_model_get_the_servers_own_answer(triton: TritonServer, sidecar: SidecarProcess,
                                                                  case: str) -> None:
    headers = dict(JSON)
    if case == "shared-memory":
        body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "parameters": {
            "shared_memory_region": "nowhere", "shared_memory_byte_size": 16}}]})
    elif case == "unknown-field":
        body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
                             "future_field": 1})
    else:
        body = infer_body([1.0])
        headers["Inference-Header-Content-Length"] = "²" if case == "odd-header-length" else "9" * 5000
    before = metric(sidecar, "sidecar_unmodelled_total")
    direct = exchange(triton.url, "POST", INFER, body, headers)
    proxied = exchange(sidecar.url, "POST", INFER, body, headers)
    assert (proxied.status, proxied.body) == (direct.status, direct.body)
    assert metric(sidecar, "sidecar_unmodelled_total") == before + 1


def test_restricted_api_answers_as_triton_does(triton: TritonServer, tmp_path: Path) -> None:
    env = {"SIDECAR_RESTRICTED_API": "model-repository,statistics:admin-key=s3cret"}
    with SidecarProcess(triton.url, tmp_path, "triton", env=env) as proc:
        refused = exchange(proc.url, "POST", "/v2/repository/index")
        assert refused.status == 403
        assert refused.body == b"{\"error\":\"This API is restricted, expecting header 'admin-key'\"}"
        assert exchange(proc.url, "GET", "/v2/models/identity_fp32/stats",
                        headers={"admin-key": "wrong"}).status == 403
        assert exchange(proc.url, "POST", "/v2/repository/index", headers={"admin-key": "s3cret"}).status == 200
        assert exchange(proc.url, "POST", INFER, infer_body([1.0]), JSON).status == 200  # not restricted
        assert "s3cret" not in proc.log_path.read_text()


# -- 3. bounded -----------------------------------------------------------------------------------------


def test_a_huge_body_decodes_without_stalling_the_probes(sidecar: SidecarProcess) -> None:
    rows = 4_000_000  # ~24 MB of nested JSON rows: seconds of parsing if it ran on the event loop
    body = b'{"inputs":[{"name":"NOPE","shape":[%d,1],"datatype":"FP32","data":[%s]}]}' % (
        rows, b",".join([b"[1.5]"] * rows))
    latencies: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sent = pool.submit(exchange, sidecar.url, "POST", INFER, body, JSON, 120)
        while not sent.done():
            started = time.monotonic()
            assert exchange(sidecar.admin_url, "GET", "/livez", timeout=5).status == 200
            latencies.append(time.monotonic() - started)
        answer = sent.result()
    assert answer.status == 400  # Triton's own answer about the unknown input
    # Parsing this body takes seconds; a probe held up for a fraction of one is hand-off (copying the bytes to
    # the decoder and back), and on a shared CI core with other test modules beside it that is tens of ms.
    assert len(latencies) > 5 and max(latencies) < 0.5, f"slowest /livez {max(latencies):.3f} s"
    assert statistics.median(latencies) < 0.05


def test_bodies_in_flight_are_bounded_by_the_memory_budget(triton: TritonServer, tmp_path: Path) -> None:
    args = ["--set", "limits.max_inflight_bytes=1MiB"]
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 100000], "datatype": "FP32",
                                     "data": [1.25] * 100000}], "parameters": {"delay": 1.0}})
    assert 400_000 < len(body) < 1024 * 1024
    with SidecarProcess(triton.url, tmp_path, "triton", args) as proc, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: exchange(proc.url, "POST", "/v2/models/slow/infer", body, JSON),
                                range(3)))
    refused = [a for a in answers if a.status == 503]
    assert refused and any(a.status != 503 for a in answers)
    assert all(a.header("Retry-After") and "error" in orjson.loads(a.body) for a in refused)


def test_a_pass_through_body_over_the_limit_is_413(fake: tuple[FakeUpstream, SidecarProcess],
                                                   tmp_path: Path) -> None:
    upstream, _ = fake
    with SidecarProcess(upstream.url, tmp_path, "triton", ["--set", "limits.max_body_bytes=1KiB"]) as proc:
        sized = exchange(proc.url, "POST", "/v2/repository/index", b"x" * 2048, JSON)
        assert sized.status == 413 and "limit" in orjson.loads(sized.body)["error"]
        chunked = exchange_raw(proc.port, b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n"
                                          b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n")
        assert chunked.status == 413


def test_a_client_that_leaves_cancels_its_call_and_is_counted(triton: TritonServer, tmp_path: Path) -> None:
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
                         "parameters": {"delay": 2.0}})
    with SidecarProcess(triton.url, tmp_path, "triton") as proc:
        with RawClient(proc.port) as client:
            client.send(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: metric(proc, "sidecar_in_flight_requests") == 1, 5, "the call in flight")
        wait_until(lambda: metric(proc, 'sidecar_http_connection_events_total{event="disconnect"}') == 1, 5,
                   "the disconnect counted")
        assert metric(proc, "sidecar_in_flight_requests") == 0
    assert "Traceback" not in proc.log_path.read_text()


def test_metric_labels_only_name_models_the_server_has(sidecar: SidecarProcess) -> None:
    for i in range(50):
        exchange(sidecar.url, "POST", f"/v2/models/nonsense-{i}/infer", infer_body([1.0]), JSON)
    exchange(sidecar.url, "POST", INFER, infer_body([1.0]), JSON)
    text = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
    models = set(re.findall(r'model="([^"]*)"', text))
    assert not any(m.startswith("nonsense") for m in models)
    assert {"identity_fp32", "other"} <= models


# -- slow clients ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(fake: tuple[FakeUpstream, SidecarProcess],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    args = ["--set", "limits.header_timeout=1", "--set", "limits.body_timeout=1",
            "--set", "limits.keepalive_timeout=1"]
    with SidecarProcess(fake[0].url, tmp_path_factory.mktemp("strict"), "triton", args) as proc:
        yield proc


def test_trickled_headers_time_out_with_408(strict: SidecarProcess) -> None:
    """A line every 0.3 s keeps every single read fast: only a deadline on the whole header section ends it."""
    stop = threading.Event()
    with RawClient(strict.port) as client:
        client.send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")

        def trickle() -> None:
            while not stop.wait(0.3):
                try:
                    client.send(b"X-Slow: 1\r\n")
                except OSError:
                    return

        started = time.monotonic()
        worker = threading.Thread(target=trickle, daemon=True)
        worker.start()
        try:
            answer = client.answer()
        finally:
            stop.set()
            worker.join()
        assert answer.status == 408 and time.monotonic() - started < 3


def test_a_stalled_body_times_out_with_408(strict: SidecarProcess) -> None:
    with RawClient(strict.port) as client:
        client.send(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        answer = client.answer()
        assert answer.status == 408 and time.monotonic() - started < 3
        assert client.closed_by_peer()


def test_idle_keep_alive_connections_are_closed(strict: SidecarProcess) -> None:
    with RawClient(strict.port) as client:
        client.send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.answer().status == 200
        assert client.closed_by_peer(timeout=4)


def test_idle_connections_cannot_starve_callers_or_probes(fake: tuple[FakeUpstream, SidecarProcess],
                                                          tmp_path: Path) -> None:
    """1,100 idle connections under a 1,024 descriptor limit: calls and the admin port still answer."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    proc = SidecarProcess(fake[0].url, tmp_path, "triton")
    proc.command_prefix = ["prlimit", "--nofile=1024:1024", "--"]
    idle: list[socket.socket] = []
    with proc:
        try:
            for _ in range(1100):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", proc.port), timeout=5))
                except OSError:
                    break
            assert exchange(proc.admin_url, "GET", "/readyz", timeout=5).status == 200
            assert exchange(proc.url, "GET", "/v2/health/live", timeout=5).status == 200
        finally:
            for sock in idle:
                sock.close()


def test_malformed_requests_never_reach_the_log(fake: tuple[FakeUpstream, SidecarProcess]) -> None:
    _, proc = fake
    marker = b"SECRET-MARKER-7f3a"
    for raw in (b"GET /" + marker + b"\x01 HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + marker + b"\x00\r\n\r\n",
                b"BREW " + marker + b" HTCPCP/1.0\r\n\r\n"):
        with RawClient(proc.port) as client:
            client.send(raw)
            client.closed_by_peer()
    assert marker.decode() not in proc.log_path.read_text()
