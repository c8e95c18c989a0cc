"""The forecast in a running sidecar in front of a real Triton: the calls it answers reach the per-minute
history (read back by ``sidecar history export``), the pod's launch-to-warm is measured, and /status and
/metrics show the lead, the forecasts and what the pod serves."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import orjson

from tests.servers import wait_until
from tests.sidecar_proc import SidecarProcess
from tests.wire import exchange

MODEL = "identity_fp32"
JSON = {"Content-Type": "application/json"}


def body(value: float) -> bytes:
    return orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}]})


def recorded(sidecar: SidecarProcess) -> int:
    """Calls of MODEL in the history, as the CLI exports them from the sidecar's own history file."""
    store = sidecar.workdir / f"traffic-{sidecar.port}.db"
    out = subprocess.run([sys.executable, "-m", "sidecar", "history", "export", "--store", str(store),
                          "--model", MODEL], capture_output=True, text=True, timeout=60, check=True).stdout
    return sum(int(row["requests"]) for row in csv.DictReader(io.StringIO(out)))


def test_the_sidecar_keeps_demand_history_and_reports_forecast(sidecar: SidecarProcess) -> None:
    before = recorded(sidecar)
    for i in range(25):
        assert exchange(sidecar.url, "POST", f"/v2/models/{MODEL}/infer", body(float(i)), JSON).status == 200
    wait_until(lambda: recorded(sidecar) >= before + 25, 30, "the 25 calls in the exported history")

    status = orjson.loads(exchange(sidecar.admin_url, "GET", "/status?format=json").body)["forecast"]
    assert status["launch_to_warm"] is not None and 0 < status["launch_to_warm"] < 120
    assert status["lead"]["seconds"] > 0 and status["history"].startswith("sqlite")
    # Too little history for a forecast (a day at least): no number, never a forecast of zero.
    assert all(m["forecast"] is None for m in status["models"].values())

    def serves() -> bool:  # learned at the next history tick from the rate it served
        metrics = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
        return f'sidecar_capacity_requests_per_second{{model="{MODEL}"}}' in metrics

    wait_until(serves, 30, "a capacity learned for the model")
    metrics = exchange(sidecar.admin_url, "GET", "/metrics").body.decode()
    assert "sidecar_forecast_lead_seconds " in metrics
    assert "sidecar_forecast_requests_per_second{" not in metrics  # no forecast yet: no series
    text = exchange(sidecar.admin_url, "GET", "/status").body.decode()
    assert "forecast: lead" in text and "no forecast yet" in text
