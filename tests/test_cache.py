"""The response cache end to end: real Triton, real Redis, a real KServe ModelServer, real sidecars.

What reaches the model server is counted by the model server itself (Triton's statistics API,
``GET /v2/models/{m}/stats``), never inferred from the sidecar's own reports. Every wait is on a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
import tritonclient.http as httpclient

from tests.servers import HOST, MODELS_DIR, KServeServer, RedisServer, TritonServer, wait_until, wait_until_async
from tests.sidecar_proc import SidecarProcess
from tests.wire import Answer, exchange

JSON = {"Content-Type": "application/json"}
TOKEN = "t0ken-for-tests"
FAST = ["--set", "upstream.health_interval=0.25", "--set", "log_level=warning", "--set", "shutdown_delay=0"]
# Generous shared-tier timeouts: two shared cores under load must not turn reads into misses here.
SHARED = ["--set", "cache.redis_timeout=0.5"]
IDENTITY = "identity_fp32"


# -- helpers -------------------------------------------------------------------------------------------


def infer_body(values: list[float], *, rid: str | None = None, binary: bool = False,
               parameters: dict[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "INPUT0", "shape": [1, len(values)], "datatype": "FP32",
                                       "data": values}]}
    if rid is not None:
        doc["id"] = rid
    params = dict(parameters or {})
    if binary:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    return orjson.dumps(doc)


def post(base: str, body: bytes, model: str = IDENTITY, headers: dict[str, str] | None = None) -> Answer:
    return exchange(base, "POST", f"/v2/models/{model}/infer", body, {**JSON, **(headers or {})}, timeout=30)


def cache_of(answer: Answer) -> str | None:
    return answer.header("x-sidecar-cache")


def status(sidecar: SidecarProcess) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(exchange(sidecar.admin_url, "GET", "/status?format=json").body)
    return data


def metric(sidecar: SidecarProcess, name: str) -> float | None:
    """The value of one sample (``name`` with its labels as rendered), or None when absent."""
    for line in exchange(sidecar.admin_url, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def flush(sidecar: SidecarProcess, token: str | None, query: str = "") -> Answer:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return exchange(sidecar.admin_url, "POST", f"/cache/flush{query}", b"", headers)


def outputs_of(answer: Answer) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON header, output arrays) of a KServe v2 answer in either encoding."""
    length = answer.header("Inference-Header-Content-Length")
    result = httpclient.InferenceServerClient.parse_response_body(
        answer.body, header_length=int(length) if length is not None else None)
    header: dict[str, Any] = result.get_response()
    return header, {o["name"]: result.as_numpy(o["name"]) for o in header["outputs"]}


def shared_keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=b"warm-sidecar:*:c:*"))  # <prefix>:<namespace>:c:...
    finally:
        client.close()


def cached_sidecar(upstream: str, workdir: Path, *extra: str, protocol: str = "triton") -> SidecarProcess:
    return SidecarProcess(upstream, workdir, protocol, ["--set", "cache.models=*", *FAST, *extra])


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """The session Triton behind a sidecar caching every model, with an admin token."""
    with cached_sidecar(triton.url, tmp_path_factory.mktemp("cached"), "--set", f"admin_token={TOKEN}") as proc:
        yield proc


@pytest.fixture(scope="module")
def cached_workers(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """The same, with two data-plane workers sharing one answer tier (single-flight is per worker)."""
    with cached_sidecar(triton.url, tmp_path_factory.mktemp("cached-workers"), "--set", f"admin_token={TOKEN}",
                        "--set", "workers=2") as proc:
        yield proc


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("cache-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def own_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A Triton of our own in explicit mode, over a repository this module may change (and a test kills)."""
    work = tmp_path_factory.mktemp("own-triton")
    repository = work / "models"
    shutil.copytree(MODELS_DIR / IDENTITY, repository / IDENTITY, ignore=shutil.ignore_patterns("__pycache__"))
    with TritonServer(repository, work, models=[IDENTITY]) as server:
        yield server


# -- encodings and ids ---------------------------------------------------------------------------------


def test_json_and_binary_callers_each_get_their_own_encoding_and_id(triton: TritonServer,
                                                                    cached: SidecarProcess) -> None:
    values = [0.1, -2.5, 1024.125, 1e-7, -0.0, 7.0, 65504.0]
    before = triton.model_counts(IDENTITY)
    assert cache_of(post(cached.url, infer_body(values, rid="first"))) == "miss"
    for rid, binary in (("json-caller", False), ("binary-caller", True), ("", False), ("", True)):
        body = infer_body(values, rid=rid or None, binary=binary)
        hit, direct = post(cached.url, body), post(triton.url, body)
        assert cache_of(hit) == "hit"
        # Byte for byte what Triton itself answers this caller: its encoding, its id, Triton's key order.
        assert (hit.status, hit.body) == (direct.status, direct.body)
        assert hit.header("Content-Type") == direct.header("Content-Type")
        assert hit.header("Inference-Header-Content-Length") == direct.header("Inference-Header-Content-Length")
        header, arrays = outputs_of(hit)
        assert header.get("id", "") == rid
        np.testing.assert_array_equal(arrays["OUTPUT0"], np.array([values], dtype=np.float32))
    # The first miss and the direct calls only: every other sidecar answer came from the cache.
    assert triton.counts_since(IDENTITY, before, 5)[0] == 5


def test_every_float_is_written_as_triton_writes_it(triton: TritonServer, cached: SidecarProcess) -> None:
    # Triton's RapidJSON (Grisu2) digits are not the shortest round-trip text: 1234.5677490234376,
    # not 1234.5677490234375; 3.3999999521443644e38, not 3.3999999521443642e+38; 99999998430674950.0.
    values = [1234.5678, 1.0e17, 3.4e38, 0.1, -2.5, 1e-7, -0.0, 7.0, 65504.0,
              1e-30, 123456789012, 1e21, 1e22, 0.000001, 1.5e-5, -13.166112899780273, 1.401298464324817e-45]
    body = infer_body(values, rid="floats")
    post(cached.url, body)
    hit, direct = post(cached.url, body), post(triton.url, body)
    assert cache_of(hit) == "hit"
    assert b"1234.5677490234376,99999998430674950.0,3.3999999521443644e38," in direct.body
    assert hit.body == direct.body


def binary_body(datatype: str, elements: list[bytes] | np.ndarray, rid: str, json_output: bool) -> tuple[bytes, int]:
    """(body, JSON header length): one input in the binary section; outputs asked in JSON or binary."""
    if datatype == "BYTES":
        data = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
        shape = [1, len(elements)]
    else:
        data, shape = np.asarray(elements).tobytes(), [1, len(elements)]
    head = orjson.dumps({"id": rid, "inputs": [{"name": "INPUT0", "shape": shape, "datatype": datatype,
                                                 "parameters": {"binary_data_size": len(data)}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": not json_output}}]})
    return head + data, len(head)


@pytest.mark.parametrize(("model", "datatype", "elements"), [
    (IDENTITY, "FP32", np.array([1.5, np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)),
    ("bytes_echo", "BYTES", [b'a"\\\x01\x1f\n\t\x08\x0c\r/\x7f\x00z', b"", b"\xff\xfe", "\u00e9".encode()]),
])
def test_a_json_hit_is_what_triton_writes_even_where_that_is_not_json(
        triton: TritonServer, cached: SidecarProcess, model: str, datatype: str, elements: Any) -> None:
    """NaN and Infinity as bare words, strings escaped as RapidJSON escapes them (uppercase \\u001F) and
    invalid UTF-8 left raw: not JSON, but Triton's answer, so a hit for a JSON caller is the same."""
    path = f"/v2/models/{model}/infer"

    def call(base: str, json_output: bool, rid: str) -> Answer:
        body, length = binary_body(datatype, elements, rid, json_output)
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}
        return exchange(base, "POST", path, body, headers, timeout=30)

    assert cache_of(call(cached.url, False, "binary")) == "miss"  # stored from a binary answer
    hit, direct = call(cached.url, True, "json"), call(triton.url, True, "json")
    assert cache_of(hit) == "hit"
    assert (hit.status, hit.body) == (direct.status, direct.body)


# -- tritonclient ----------------------------------------------------------------------------------------


def _fp32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _cases(rng: np.random.Generator) -> list[tuple[str, str, list[tuple[str, np.ndarray, bool]],
                                                    list[tuple[str, bool]] | None]]:
    """(label, model, inputs (name, array, binary), requested outputs (name, binary) or None for all)."""
    a, b = _fp32(rng, (4,)), _fp32(rng, (4,))
    words = np.array([[b"a", b"\x00\xffbinary", "\u00e9t\u00e9".encode(), b""]], dtype=object)
    text = np.array([[b"hello", "w\u00f6rld".encode()]], dtype=object)
    return [
        ("fp32 binary", IDENTITY, [("INPUT0", _fp32(rng, (2, 5)), True)], [("OUTPUT0", True)]),
        ("fp32 json", IDENTITY, [("INPUT0", _fp32(rng, (1, 3)), False)], [("OUTPUT0", False)]),
        ("fp32 default outputs", IDENTITY, [("INPUT0", _fp32(rng, (1, 6)), True)], None),
        ("bytes binary", "bytes_echo", [("INPUT0", words, True)], [("OUTPUT0", True)]),
        ("bytes json", "bytes_echo", [("INPUT0", text, False)], [("OUTPUT0", False)]),
        ("add_sub both", "add_sub", [("INPUT0", a, True), ("INPUT1", b, False)], [("OUTPUT0", True),
                                                                                  ("OUTPUT1", False)]),
        ("add_sub all", "add_sub", [("INPUT0", a, False), ("INPUT1", b, False)], None),
        ("add_sub subset", "add_sub", [("INPUT0", a, True), ("INPUT1", b, True)], [("OUTPUT1", True)]),
        ("add_sub subset json", "add_sub", [("INPUT0", a, True), ("INPUT1", b, True)], [("OUTPUT1", False)]),
    ]


def _client_infer(url: str, model: str, inputs: list[tuple[str, np.ndarray, bool]],
                  outputs: list[tuple[str, bool]] | None) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    try:
        wired = []
        for name, array, binary in inputs:
            datatype = "BYTES" if array.dtype == object else "FP32"
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=binary)
            wired.append(tensor)
        wanted = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in outputs]
        return client.infer(model, wired, outputs=wanted)
    finally:
        client.close()


def test_tritonclient_results_are_identical_to_direct_calls(triton: TritonServer, cached: SidecarProcess) -> None:
    rng = np.random.default_rng(2024)
    for label, model, inputs, outputs in _cases(rng):
        direct = _client_infer(triton.url, model, inputs, outputs)
        seen = status(cached)["cache"]["models"].get(model, {})
        before = (seen.get("hits", 0), seen.get("misses", 0))
        results = [_client_infer(cached.url, model, inputs, outputs) for _ in range(2)]
        seen = status(cached)["cache"]["models"][model]
        # The first call of a case may hit when an earlier case asked for the same tensors in another form.
        assert seen["hits"] - before[0] >= 1 and seen["hits"] + seen["misses"] - sum(before) == 2, label
        for result in results:
            assert result.get_response() == direct.get_response(), label
            for out in direct.get_response()["outputs"]:
                got, want = result.as_numpy(out["name"]), direct.as_numpy(out["name"])
                assert got.dtype == want.dtype and got.shape == want.shape, label
                np.testing.assert_array_equal(got, want, err_msg=label)


# -- the shared tier ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(triton: TritonServer, shared_redis: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SidecarProcess, SidecarProcess]]:
    """Two replicas sharing one Redis: the first through cache.redis, the second through a redis:// store."""
    work = tmp_path_factory.mktemp("replicas")
    with (cached_sidecar(triton.url, work, "--set", f"cache.redis={shared_redis.url}", "--set",
                         f"admin_token={TOKEN}", *SHARED) as first,
          cached_sidecar(triton.url, work, "--store", shared_redis.url, *SHARED) as second):
        yield first, second


def test_a_replica_answers_from_redis_what_only_another_replica_saw(
        triton: TritonServer, shared_redis: RedisServer, replicas: tuple[SidecarProcess, SidecarProcess]) -> None:
    first, second = replicas
    body = infer_body([11.0, 12.0, 13.0], rid="seen-by-first")
    assert cache_of(post(first.url, body)) == "miss"
    wait_until(lambda: shared_keys(shared_redis.url), 10, "the answer written to Redis")
    # The second replica shares the fleet's answers of a model once it has asked its own server the fleet's
    # probe request (cache/fingerprint.py): the models answer alike, so the answers are its own.
    wait_until(lambda: IDENTITY in status(second)["cache"]["fingerprints"], 10, "the second replica's fingerprint")
    before = triton.settled_counts(IDENTITY)
    answer = post(second.url, infer_body([11.0, 12.0, 13.0], rid="asked-of-second"))
    assert answer.status == 200 and cache_of(answer) == "hit"
    # The second's answer cost neither an inference nor an execution.
    assert triton.settled_counts(IDENTITY) == before
    header, arrays = outputs_of(answer)
    assert header["id"] == "asked-of-second"
    np.testing.assert_array_equal(arrays["OUTPUT0"], np.array([[11.0, 12.0, 13.0]], dtype=np.float32))
    assert status(second)["cache"]["models"][IDENTITY]["redis_hits"] == 1
    # Now in the second replica's own memory: a hit without Redis.
    assert cache_of(post(second.url, body)) == "hit"
    assert status(second)["cache"]["models"][IDENTITY]["redis_hits"] == 1


def test_a_flush_on_one_replica_reaches_the_others_memory(
        triton: TritonServer, replicas: tuple[SidecarProcess, SidecarProcess]) -> None:
    first, second = replicas
    body = infer_body([21.0, 22.0])
    assert cache_of(post(first.url, body)) == "miss"
    wait_until(lambda: cache_of(post(second.url, body)) == "hit", 10, "the second replica holding the answer")
    assert flush(first, TOKEN).status == 200
    # The second replica reads the fleet's new epoch within its refresh interval; its in-process copy is gone.
    wait_until(lambda: cache_of(post(second.url, body)) == "miss", 10, "a miss on the other replica")


def test_redis_killed_and_restarted_under_load(triton: TritonServer, redis_server: RedisServer,
                                              tmp_path: Path) -> None:
    args = ["--set", f"cache.redis={redis_server.url}", "--set", "cache.redis_failures=2",
            "--set", "cache.redis_cooldown=0.2", *SHARED]
    with cached_sidecar(triton.url, tmp_path, *args) as sidecar:
        outcomes: list[tuple[float, int, str | None]] = []
        stop = threading.Event()

        def load() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                # Every other call is new (a miss, so a Redis read and write); the rest repeat (in-process hits).
                values = [float(n), -1.0] if n % 2 else [float(n % 6), 0.5]
                try:
                    answer = post(sidecar.url, infer_body(values))
                    outcomes.append((time.monotonic(), answer.status, cache_of(answer)))
                except Exception as e:  # any failure of a call is what this test counts
                    outcomes.append((time.monotonic(), 0, repr(e)))

        def hits_since(mark: float) -> int:
            return sum(1 for t, s, c in list(outcomes) if t > mark and s == 200 and c == "hit")

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            wait_until(lambda: hits_since(0) >= 5, 20, "hits before the kill")
            wait_until(lambda: shared_keys(redis_server.url), 10, "answers in Redis")
            breaker = "sidecar_cache_redis_breaker_open"
            assert metric(sidecar, breaker) == 0.0
            assert metric(sidecar, "sidecar_cache_redis_breaker_openings_total") == 0.0
            redis_server.kill()
            killed = time.monotonic()
            wait_until(lambda: metric(sidecar, breaker) == 1.0, 10, "the breaker open")
            wait_until(lambda: hits_since(killed) >= 5, 10, "in-process hits while Redis is down")
            redis_server.start()
            restarted = time.monotonic()
            wait_until(lambda: metric(sidecar, breaker) == 0.0, 30, "the breaker closed again")
            wait_until(lambda: shared_keys(redis_server.url), 10, "answers written to the new Redis")
            wait_until(lambda: hits_since(restarted) >= 5, 10, "hits after the restart")
        finally:
            stop.set()
            worker.join(30)
        failed = [o for o in outcomes if o[1] != 200]
        assert not failed, f"{len(failed)} of {len(outcomes)} calls failed: {failed[:5]}"
        assert metric(sidecar, 'sidecar_cache_redis_errors_total{kind="read"}') or \
            metric(sidecar, 'sidecar_cache_redis_errors_total{kind="write"}')
        assert metric(sidecar, "sidecar_cache_redis_breaker_openings_total") >= 1
        assert metric(sidecar, "sidecar_cache_redis_dropped_writes_total") >= 1  # misses while Redis was down


async def test_writes_still_queued_at_shutdown_reach_redis(shared_redis: RedisServer) -> None:
    from sidecar.cache.redis import RedisTier
    from sidecar.redis.breaker import Breaker
    from sidecar.redis.client import RedisClient

    client = RedisClient(shared_redis.url, Breaker(3, 1.0))
    tier = RedisTier(client, "close-test", 0.05)
    for n in range(200):  # no writer task runs: everything is still queued when the pod shuts down
        tier.put(b"close-test:c:g:%d" % n, b"answer %d" % n, 60.0)
    await tier.close()
    await client.close()
    assert len(redis.Redis.from_url(shared_redis.url).keys("close-test:c:*")) == 200
    assert tier.dropped_writes == 0


# -- invalidation --------------------------------------------------------------------------------------


def test_a_reload_or_a_version_change_invalidates(own_triton: TritonServer, tmp_path: Path) -> None:
    with cached_sidecar(own_triton.url, tmp_path, "--set", "record.enabled=false") as sidecar:
        body = infer_body([31.0, 32.0])
        assert [cache_of(post(sidecar.url, body)) for _ in range(2)] == ["miss", "hit"]

        # A load through the data port (the repository API) is a reload: the next call is a miss.
        loaded = exchange(sidecar.url, "POST", f"/v2/repository/models/{IDENTITY}/load", b"", JSON)
        assert loaded.status == 200, loaded.body
        # (Triton's statistics restart with the reloaded model, so they cannot count this call reliably.)
        answer = post(sidecar.url, body)
        assert cache_of(answer) == "miss" and outputs_of(answer)[0]["model_version"] == "1"
        assert cache_of(post(sidecar.url, body)) == "hit"

        # A new version loaded behind the sidecar's back (straight at Triton): the monitor sees it.
        runs = status(sidecar)["warmups_run"]
        shutil.copytree(own_triton.model_repository / IDENTITY / "1", own_triton.model_repository / IDENTITY / "2",
                        ignore=shutil.ignore_patterns("__pycache__"))
        assert exchange(own_triton.url, "POST", f"/v2/repository/models/{IDENTITY}/load", b"", JSON).status == 200
        wait_until(lambda: (s := status(sidecar))["warmups_run"] > runs and s["state"] == "warm", 20,
                   "the new version noticed")
        answer = post(sidecar.url, body)
        assert cache_of(answer) == "miss" and outputs_of(answer)[0]["model_version"] == "2"

        # Admin actions are refused while no token is configured.
        assert flush(sidecar, None).status == 403
        assert flush(sidecar, TOKEN).status == 403


def test_admin_flush_needs_the_token(cached: SidecarProcess) -> None:
    body = infer_body([41.0, 42.0])
    post(cached.url, body)
    assert cache_of(post(cached.url, body)) == "hit"
    for token in (None, "wrong-token"):
        refused = flush(cached, token)
        assert refused.status == 401 and refused.header("WWW-Authenticate")
        assert cache_of(post(cached.url, body)) == "hit"
    one_model = flush(cached, TOKEN, "?model=add_sub")
    assert one_model.status == 200 and orjson.loads(one_model.body)["model"] == "add_sub"
    assert cache_of(post(cached.url, body)) == "hit"  # another model's flush leaves this one
    done = flush(cached, TOKEN, f"?model={IDENTITY}")
    assert done.status == 200 and orjson.loads(done.body)["flushed"] >= 1
    assert cache_of(post(cached.url, body)) == "miss"
    assert flush(cached, TOKEN).status == 200
    assert cache_of(post(cached.url, body)) == "miss"
    report = status(cached)["cache"]
    assert report["models"][IDENTITY]["misses"] >= 2 and 0 < report["models"][IDENTITY]["hit_ratio"] < 1


# -- single flight ---------------------------------------------------------------------------------------


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def as_answer(self) -> Answer:
        return Answer(self.status, list(self.headers.items()), self.body)


async def raw_post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> RawReply:
    """One call on a connection of its own; cancelling it closes the connection (the client leaves)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in {**JSON, **(headers or {})}.items())
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:] if line)
        found = {k.lower(): v for k, v in fields.items()}
        return RawReply(int(lines[0].split()[1]), found, await reader.readexactly(int(found["content-length"])))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def depth(sidecar: SidecarProcess, model: str) -> float:
    value = await asyncio.to_thread(metric, sidecar, f'sidecar_queue_depth{{model="{model}"}}')
    return value or 0.0


def slow_path() -> str:
    return "/v2/models/slow/infer"


@pytest.mark.parametrize(("front", "workers"), [("cached", 1), ("cached_workers", 2)])
async def test_identical_concurrent_calls_reach_the_model_server_once_per_worker(
        triton: TritonServer, front: str, workers: int, request: pytest.FixtureRequest) -> None:
    cached: SidecarProcess = request.getfixturevalue(front)
    values = [51.0 + workers, 52.0, 53.0]
    before = triton.model_counts("slow")
    calls = [raw_post(cached.port, slow_path(), infer_body(values, rid=f"caller-{i}", binary=i % 2 == 1,
                                                           parameters={"delay": 1.0})) for i in range(100)]
    replies = await asyncio.gather(*calls)
    upstream = triton.counts_since("slow", before, 1)[0]
    assert 1 <= upstream <= workers
    kinds = [r.headers.get("x-sidecar-cache") for r in replies]
    assert kinds.count("miss") == upstream and set(kinds) <= {"miss", "coalesced", "hit"}, kinds
    assert kinds.count("coalesced") >= 50, kinds  # they overlapped: most rode on the one call
    for i, reply in enumerate(replies):
        header, arrays = outputs_of(reply.as_answer())
        assert reply.status == 200 and header["id"] == f"caller-{i}"
        assert (reply.headers.get("inference-header-content-length") is not None) == (i % 2 == 1)
        np.testing.assert_array_equal(arrays["OUTPUT0"], np.array([values], dtype=np.float32))


async def test_a_cancelled_leader_leaves_the_others_served(triton: TritonServer, cached: SidecarProcess) -> None:
    values = [61.0, 62.0]
    before = triton.model_counts("slow")
    body = infer_body(values, parameters={"delay": 1.5})
    leader = asyncio.create_task(raw_post(cached.port, slow_path(), body))
    await wait_until_async(lambda: _at_least(cached, "slow", 1), 10, "the leader in flight")
    followers = [asyncio.create_task(raw_post(cached.port, slow_path(), infer_body(values, rid=f"f{i}", parameters={
        "delay": 1.5}))) for i in range(5)]
    await wait_until_async(lambda: _at_least(cached, "slow", 6), 10, "the followers in flight")
    leader.cancel()  # the leader's client disconnects mid-call
    await wait_until_async(lambda: _at_most(cached, "slow", 5), 10, "the leader gone")
    replies = await asyncio.gather(*followers)
    for i, reply in enumerate(replies):
        header, arrays = outputs_of(reply.as_answer())
        assert reply.status == 200 and reply.headers["x-sidecar-cache"] == "coalesced" and header["id"] == f"f{i}"
        np.testing.assert_array_equal(arrays["OUTPUT0"], np.array([values], dtype=np.float32))
    assert triton.counts_since("slow", before, 1)[0] == 1
    with pytest.raises(asyncio.CancelledError):
        await leader
    # The answer the leader started was stored for everyone after it.
    assert (await raw_post(cached.port, slow_path(), body)).headers["x-sidecar-cache"] == "hit"


async def _at_least(sidecar: SidecarProcess, model: str, n: int) -> bool:
    return await depth(sidecar, model) >= n


async def _at_most(sidecar: SidecarProcess, model: str, n: int) -> bool:
    return await depth(sidecar, model) <= n


@pytest.mark.parametrize("front", ["cached", "cached_workers"])
async def test_every_caller_gets_its_own_answer_under_random_concurrency_and_disconnects(
        front: str, request: pytest.FixtureRequest) -> None:
    """Few distinct calls (input x delay), many callers in both encodings, a quarter of them leaving mid-call."""
    cached: SidecarProcess = request.getfixturevalue(front)
    rng = random.Random(20240607)
    inputs = [[float(v), float(v) / 4, -float(v)] for v in range(1, 5)]
    delays = [0.0, 0.05, 0.15]
    gate = asyncio.Semaphore(48)
    left = 0

    async def caller(i: int) -> tuple[int, RawReply | None]:
        nonlocal left
        pick = rng.randrange(len(inputs))
        rid, binary = f"r{i}-{rng.getrandbits(32):08x}", rng.random() < 0.5
        delay = rng.choice(delays)
        body = infer_body(inputs[pick], rid=rid, binary=binary, parameters={"delay": delay} if delay else None)
        leave_after = rng.random() * 0.12 if rng.random() < 0.25 else None
        async with gate:
            task = asyncio.create_task(raw_post(cached.port, slow_path(), body))
            if leave_after is not None:
                done, _ = await asyncio.wait({task}, timeout=leave_after)
                if not done:
                    task.cancel()  # the client leaves: its connection closes mid-call
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    left += 1
                    return pick, None
            reply = await task
        header, arrays = outputs_of(reply.as_answer())
        assert reply.status == 200, reply.body
        assert header["id"] == rid
        assert (reply.headers.get("inference-header-content-length") is not None) == binary
        np.testing.assert_array_equal(arrays["OUTPUT0"], np.array([inputs[pick]], dtype=np.float32))
        return pick, reply

    def counts() -> dict[str, int]:
        return dict(status(cached)["cache"]["models"].get("slow", {}))

    before = await asyncio.to_thread(counts)
    served = 0
    for _ in range(3):
        assert (await asyncio.to_thread(flush, cached, TOKEN, "?model=slow")).status == 200
        results = await asyncio.gather(*(caller(i) for i in range(160)))
        served += sum(1 for _, r in results if r is not None)
    await wait_until_async(lambda: _at_most(cached, "slow", 0), 10, "nothing left in flight")
    after = await asyncio.to_thread(counts)
    assert served >= 300 and left >= 30, (served, left)
    # The run exercised what it is about: shared calls, stored answers and fresh ones.
    for kind in ("coalesced", "hits", "misses"):
        assert after[kind] > before.get(kind, 0), (kind, before, after)


# -- policy: Cache-Control, credentials, tenants, sequences ----------------------------------------------


def test_cache_control_no_store_and_no_cache(triton: TritonServer, cached: SidecarProcess) -> None:
    seen, new, revalidated = infer_body([71.0]), infer_body([72.0]), infer_body([73.0])
    before = triton.model_counts(IDENTITY)
    assert cache_of(post(cached.url, seen)) == "miss"
    assert cache_of(post(cached.url, seen)) == "hit"
    no_store = {"Cache-Control": "no-store"}
    # no-store: not read (the model server answers) ...
    assert cache_of(post(cached.url, seen, headers=no_store)) == "bypass"
    # ... and not written.
    assert cache_of(post(cached.url, new, headers=no_store)) == "bypass"
    assert cache_of(post(cached.url, new)) == "miss"
    # no-cache: not read, but the fresh answer is stored.
    assert cache_of(post(cached.url, seen, headers={"Cache-Control": "max-age=0, no-cache"})) == "miss"
    assert cache_of(post(cached.url, revalidated, headers={"Cache-Control": "no-cache"})) == "miss"
    assert cache_of(post(cached.url, revalidated)) == "hit"
    assert triton.counts_since(IDENTITY, before, 6)[0] == 6  # the first miss, then five more


def test_credentials_bypass_unless_scoped_and_tenants_never_share(
        triton: TritonServer, cached: SidecarProcess, tmp_path: Path) -> None:
    body = infer_body([81.0, 82.0])
    before = triton.model_counts(IDENTITY)
    assert cache_of(post(cached.url, body)) == "miss"
    for credentials in ({"Authorization": "Bearer user-a"}, {"Cookie": "session=abc"}):
        for _ in range(2):
            assert cache_of(post(cached.url, body, headers=credentials)) == "bypass"
    assert triton.counts_since(IDENTITY, before, 5)[0] == 5  # the miss, then every bypass

    with cached_sidecar(triton.url, tmp_path, "--set", "cache.scope_header=X-Tenant") as scoped:
        a = {"Authorization": "Bearer user-a", "X-Tenant": "tenant-a"}
        b = {"Authorization": "Bearer user-b", "X-Tenant": "tenant-b"}
        assert [cache_of(post(scoped.url, body, headers=a)) for _ in range(2)] == ["miss", "hit"]
        assert [cache_of(post(scoped.url, body, headers=b)) for _ in range(2)] == ["miss", "hit"]
        # Without credentials the scope still separates: no tenant sees an unscoped answer or another's.
        assert [cache_of(post(scoped.url, body)) for _ in range(2)] == ["miss", "hit"]
        assert cache_of(post(scoped.url, body, headers={"X-Tenant": "tenant-a"})) == "hit"
        # Credentials with no scope value: not cached at all.
        assert cache_of(post(scoped.url, body, headers={"Authorization": "Bearer user-c"})) == "bypass"


def test_sequence_calls_bypass(triton: TritonServer, cached: SidecarProcess) -> None:
    body = infer_body([91.0], parameters={"sequence_id": 42, "sequence_start": True})
    before = triton.model_counts(IDENTITY)
    answers = [post(cached.url, body) for _ in range(2)]
    assert [cache_of(a) for a in answers] == ["bypass", "bypass"]
    assert triton.counts_since(IDENTITY, before, 2)[0] == 2


# -- warm from the first request -------------------------------------------------------------------------


def test_recorded_calls_are_hits_the_moment_the_pod_is_ready(triton: TritonServer, tmp_path: Path) -> None:
    store = str(tmp_path / "traffic.db")
    recorded = infer_body([101.0, 102.0, 103.0], rid="recorded")
    record = ["--store", store, "--set", "record.flush_interval=0.2", *FAST]
    with SidecarProcess(triton.url, tmp_path, "triton", record) as recorder:
        for _ in range(3):
            assert post(recorder.url, recorded).status == 200
    # Leaving the context sends SIGTERM: the recorder flushes what it saw.
    with cached_sidecar(triton.url, tmp_path, "--store", store, "--set", "warmup.max_batch=1") as sidecar:
        before = triton.settled_counts(IDENTITY)  # the warm-up's calls are in
        answer = post(sidecar.url, infer_body([101.0, 102.0, 103.0], rid="first-user"))
        assert answer.status == 200 and cache_of(answer) == "hit"
        assert triton.model_counts(IDENTITY) == before
        assert outputs_of(answer)[0]["id"] == "first-user"


# -- stale-if-error ----------------------------------------------------------------------------------------


def test_stale_if_error_serves_an_expired_answer_while_triton_is_down(own_triton: TritonServer,
                                                                     tmp_path: Path) -> None:
    args = ["--set", "cache.ttl=1", "--set", "cache.stale_if_error=120", "--set", "record.enabled=false"]
    with cached_sidecar(own_triton.url, tmp_path, *args) as sidecar:
        values = [111.0, 112.0]
        assert cache_of(post(sidecar.url, infer_body(values))) == "miss"
        own_triton.kill()
        # Fresh for a second (hits), then expired: the model server is gone, so the answer comes back stale.
        def stale() -> Answer | None:
            answer = post(sidecar.url, infer_body(values, rid="late"))
            return answer if cache_of(answer) == "stale" else None

        answer = wait_until(stale, 10, "a stale answer")
        assert answer is not None
        header, arrays = outputs_of(answer)
        assert answer.status == 200 and header["id"] == "late"
        np.testing.assert_array_equal(arrays["OUTPUT0"], np.array([values], dtype=np.float32))
        assert post(sidecar.url, infer_body([113.0])).status == 502  # never seen: nothing to fall back on
        assert metric(sidecar, f'sidecar_cache_requests_total{{model="{IDENTITY}",result="stale"}}') == 1.0


# -- TF Serving REST -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kserve_cached(kserve: KServeServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    with cached_sidecar(kserve.url, tmp_path_factory.mktemp("ks-cached"), "--set", f"upstream.models={kserve.model}",
                        protocol="tfserving") as proc:
        yield proc


@pytest.mark.parametrize(("first", "second"), [
    ({"instances": [[1.0, 2.5], [3.0, -4.0]]}, {"inputs": [[1.0, 2.5], [3.0, -4.0]]}),
    ({"inputs": [5, 6, 7]}, {"instances": [5, 6, 7]}),
    ({"signature_name": "serving_default", "inputs": {"x": [[1.5]], "y": [[2.5]]}},
     {"signature_name": "serving_default", "inputs": {"y": [[2.5]], "x": [[1.5]]}}),
])
def test_tfserving_rest_row_and_columnar_callers_share_one_answer(
        kserve: KServeServer, kserve_cached: SidecarProcess, first: dict[str, Any], second: dict[str, Any]) -> None:
    predict = kserve.predict_path

    def ask(base: str, doc: dict[str, Any]) -> Answer:
        return exchange(base, "POST", predict, orjson.dumps(doc), JSON)

    for doc, expected in ((first, "miss"), (first, "hit"), (second, "hit"), (second, "hit")):
        answer, direct = ask(kserve_cached.url, doc), ask(kserve.url, doc)
        assert answer.status == direct.status == 200
        assert cache_of(answer) == expected, (doc, expected)
        # Each caller gets the answer in its own form: predictions for rows, outputs for columns.
        assert orjson.loads(answer.body) == orjson.loads(direct.body)


def test_a_flush_of_every_model_reaches_the_shared_tier_for_tfserving(
        kserve: KServeServer, shared_redis: RedisServer, tmp_path: Path) -> None:
    args = ["--set", f"cache.redis={shared_redis.url}", "--set", f"admin_token={TOKEN}", *SHARED]
    with cached_sidecar(kserve.url, tmp_path, *args, protocol="tfserving") as sidecar:
        doc = orjson.dumps({"instances": [[9.0, 9.5]]})
        written = len(shared_keys(shared_redis.url))
        assert cache_of(exchange(sidecar.url, "POST", kserve.predict_path, doc, JSON)) == "miss"
        wait_until(lambda: len(shared_keys(shared_redis.url)) > written, 10, "the answer written to Redis")
        assert flush(sidecar, TOKEN).status == 200
        assert cache_of(exchange(sidecar.url, "POST", kserve.predict_path, doc, JSON)) == "miss"
