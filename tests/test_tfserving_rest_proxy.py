"""TF Serving-style REST through the sidecar, against a real KServe ModelServer (v1 = TF row format)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from tests.servers import KServeServer
from tests.sidecar_proc import SidecarProcess, http_status
from tests.wire import Answer, exchange

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "body",
    [
        {"instances": [[1.0, 2.0], [3.0, 4.5]]},
        {"instances": [1, 2, 3]},
        {"signature_name": "serving_default", "instances": [[0.25]]},
        {"inputs": {"x": [[1, 2]]}},
        # KServe's own 400 for a string where it wants numbers: the error comes back unchanged.
        {"instances": [["a"]]},
    ],
)
def test_predict_is_byte_identical(kserve: KServeServer, kserve_sidecar: SidecarProcess, body: object) -> None:
    raw = orjson.dumps(body)
    direct = exchange(kserve.url, "POST", "/v1/models/tfmodel:predict", raw, JSON)
    proxied = exchange(kserve_sidecar.url, "POST", "/v1/models/tfmodel:predict", raw, JSON)
    assert (proxied.status, proxied.body) == (direct.status, direct.body)
    assert proxied.header("Content-Type") == direct.header("Content-Type")


def test_unknown_model_error_is_unchanged(kserve: KServeServer, kserve_sidecar: SidecarProcess) -> None:
    raw = orjson.dumps({"instances": [[1.0]]})
    direct = exchange(kserve.url, "POST", "/v1/models/nope:predict", raw, JSON)
    proxied = exchange(kserve_sidecar.url, "POST", "/v1/models/nope:predict", raw, JSON)
    assert direct.status == 404
    assert (proxied.status, proxied.body) == (direct.status, direct.body)


def test_model_status_passes_through(kserve: KServeServer, kserve_sidecar: SidecarProcess) -> None:
    direct = exchange(kserve.url, "GET", "/v1/models/tfmodel")
    proxied = exchange(kserve_sidecar.url, "GET", "/v1/models/tfmodel")
    assert (proxied.status, proxied.body) == (direct.status, direct.body)


def test_a_call_the_codec_cannot_model_gets_the_servers_own_answer(kserve: KServeServer,
                                                                    kserve_sidecar: SidecarProcess) -> None:
    raw = orjson.dumps({"instances": [[1, 2], [3]]})  # ragged rows: TF Serving refuses them, KServe serves them
    direct = exchange(kserve.url, "POST", "/v1/models/tfmodel:predict", raw, JSON)
    proxied = exchange(kserve_sidecar.url, "POST", "/v1/models/tfmodel:predict", raw, JSON)
    assert (proxied.status, proxied.body) == (direct.status, direct.body)


def test_ready_when_the_configured_model_is_ready(kserve_sidecar: SidecarProcess) -> None:
    assert http_status(kserve_sidecar.admin_url + "/readyz") == 200
    assert http_status(kserve_sidecar.admin_url + "/startupz") == 200


# -- what TF Serving reads differently: never cached ---------------------------------------------------------
#
# Each pair: a first caller spells a call the way TF Serving reads otherwise than a correct JSON reader (a key
# given twice: RapidJSON's FindMember finds the first, orjson keeps the last; a number RapidJSON, without full
# precision, reads as another double; an integer a DT_FLOAT signature refuses where it rounds the same value
# written as a float), then a second caller asks what the sidecar used to make of it. The stand-in parses with
# orjson (last key wins, correctly rounded numbers, no NaN), so its answers cannot show TF Serving's reading;
# what they can show is that the ambiguous call went upstream untouched ("bypass") and shaped no cache entry: the
# second caller is a miss, answered by the server itself.

FAST = ["--set", "upstream.health_interval=0.25", "--set", "log_level=warning", "--set", "shutdown_delay=0"]


@pytest.fixture(scope="module")
def kserve_cached(kserve: KServeServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    args = ["--set", "cache.models=*", "--set", f"upstream.models={kserve.model}", *FAST]
    with SidecarProcess(kserve.url, tmp_path_factory.mktemp("ks-cached"), "tfserving", args) as proc:
        yield proc


def _ask(base: str, body: bytes) -> Answer:
    return exchange(base, "POST", "/v1/models/tfmodel:predict", body, JSON)


@pytest.mark.parametrize(
    ("ambiguous", "meanings"),
    [
        # TF Serving reads [[1.25]] (the first), orjson [[2.25]] (the last).
        (b'{"instances": [[1.25]], "instances": [[2.25]]}', [{"instances": [[2.25]]}, {"instances": [[1.25]]}]),
        (b'{"inputs": {"x": [3.25], "x": [4.25]}}', [{"inputs": {"x": [4.25]}}, {"inputs": {"x": [3.25]}}]),
        (b'{"signature_name": "serving_default", "signature_name": "other", "inputs": [5.25]}',
         [{"signature_name": "other", "inputs": [5.25]}, {"signature_name": "serving_default", "inputs": [5.25]}]),
        # 0.3 to orjson, 0.29999999999999993 to TF Serving (RapidJSON's ParseNumber without full precision).
        (b'{"instances": [[0.29999999999999997]]}', [{"instances": [[0.3]]}]),
        # A DT_FLOAT signature refuses the integer (IsLosslessDecimal) and rounds 16777217.0 to 16777216.
        (b'{"instances": [[16777217, 0.5]]}', [{"instances": [[16777217.0, 0.5]]}]),
    ],
)
def test_an_ambiguous_spelling_shapes_no_cache_entry(kserve: KServeServer, kserve_cached: SidecarProcess,
                                                     ambiguous: bytes, meanings: list[object]) -> None:
    first, direct = _ask(kserve_cached.url, ambiguous), _ask(kserve.url, ambiguous)
    assert (first.status, first.body) == (direct.status, direct.body)
    assert first.header("x-sidecar-cache") == "bypass"  # forwarded untouched, not modelled
    for meaning in meanings:
        raw = orjson.dumps(meaning)
        answer, direct = _ask(kserve_cached.url, raw), _ask(kserve.url, raw)
        assert answer.header("x-sidecar-cache") == "miss", meaning
        assert (answer.status, answer.body) == (direct.status, direct.body)
        again = _ask(kserve_cached.url, raw)  # the unambiguous call itself is modelled and cached
        assert again.header("x-sidecar-cache") == "hit"
        assert orjson.loads(again.body) == orjson.loads(direct.body)


def test_a_number_tf_serving_reads_otherwise_is_never_cached(kserve: KServeServer,
                                                              kserve_cached: SidecarProcess) -> None:
    """repr() of a float32 widened to a double, which RapidJSON reads one unit in the last place off."""
    raw = b'{"instances": [[3.7734267711639404, 1.5]]}'
    for _ in range(2):
        answer, direct = _ask(kserve_cached.url, raw), _ask(kserve.url, raw)
        assert answer.header("x-sidecar-cache") == "bypass"
        assert (answer.status, answer.body) == (direct.status, direct.body)
