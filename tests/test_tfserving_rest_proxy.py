"""TF Serving-style REST through the sidecar, against a real KServe ModelServer (v1 = TF row format)."""

from __future__ import annotations

import orjson
import pytest

from tests.servers import KServeServer
from tests.sidecar_proc import SidecarProcess, http_status
from tests.wire import exchange

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
