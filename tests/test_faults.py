"""The sidecar outlives its model server's faults.

A real Triton is frozen (SIGSTOP on its process group), resumed (SIGCONT), killed (SIGKILL) and started
again on the same ports, each under concurrent HTTP and gRPC load through one sidecar. Throughout:

- every call is answered within a bound derived from the configured timeouts, with a status the model
  server's own clients know (HTTP 200/502/503/504 with ``{"error": ...}``; gRPC OK/UNAVAILABLE/
  DEADLINE_EXCEEDED), never left hanging;
- the admin port answers ``/livez`` promptly, and ``/readyz`` is 503 while the server is frozen or dead;
- the sidecar idles while the server is frozen (no busy loop);
- the sidecar recovers: ready again, and calls over both protocols succeed, once the server is back.

One Triton and one sidecar serve the whole module; each test leaves them healthy for the next.
"""

from __future__ import annotations

import collections
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2

from tests.servers import HOST, MODELS_DIR, TritonServer, http_status, wait_until
from tests.sidecar_proc import SidecarProcess

TIMEOUT = 1.0  # upstream.timeout: an inference call's whole budget at the sidecar
CONNECT_TIMEOUT = 0.5  # upstream.connect_timeout
HEALTH_INTERVAL = 0.2  # upstream.health_interval
# Every call ends within its budget; the rest is scheduling on a small machine that also runs Triton.
BOUND = TIMEOUT + 1.5
# A call still unanswered after this is hung: the client gives up on it (and the test fails).
HANG = BOUND + 3.0
# Kubernetes' default probe timeout (timeoutSeconds: 1): a slower /livez fails the probe. Measured from the test
# process, on a CI machine running other test modules and their servers beside this one.
LIVEZ_BOUND = 1.0
# While the server is frozen the load's calls wait out their timeouts: the sidecar should be all but idle.
FROZEN_CPU = 0.25  # seconds of CPU per second of wall clock, at most
# Readiness follows a probe that times out, plus an interval: a few seconds at most.
NOT_READY_WITHIN = 5.0
# A server back on its ports: probe, warm-up replay, and the gRPC channels' reconnect.
RECOVERY = 30.0
# Once the sidecar is ready again, gRPC calls succeed too: its channels to the model server try again at
# least every second however long the server was gone (gRPC's own backoff grows to two minutes).
RECONNECTED_WITHIN = 1.5
DEAD_FOR = 3.0  # seconds the killed server stays down, the sidecar watched meanwhile

MODEL = "identity_fp32"
INFER_PATH = f"/v2/models/{MODEL}/infer"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
HTTP_BODY = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})
HTTP_ANSWERS = {"200", "502", "503", "504"}
GRPC_ANSWERS = {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}


def grpc_body() -> bytes:
    message = service_pb2.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.array([1, 2], dtype="<f4").tobytes())
    return bytes(message.SerializeToString())


@dataclass(frozen=True)
class Outcome:
    kind: str  # "http" | "grpc"
    result: str  # the HTTP status, the gRPC code name, or "hung" / "error: <type>"
    started: float
    took: float
    shape_ok: bool = True  # an HTTP error answer is {"error": "..."}, as the model server's are

    @property
    def ok(self) -> bool:
        return self.result in ("200", "OK")


class Load:
    """HTTP and gRPC callers in threads, each calling the sidecar in a loop and recording every outcome.

    gRPC calls carry no deadline, so the sidecar's own upstream.timeout is what bounds them; a client-side
    wait of HANG seconds only catches a call the sidecar never answers.
    """

    def __init__(self, proc: SidecarProcess, http_callers: int = 4, grpc_callers: int = 3) -> None:
        self.proc = proc
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._http, daemon=True) for _ in range(http_callers)]
        self._threads += [threading.Thread(target=self._grpc, daemon=True) for _ in range(grpc_callers)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HANG + 2)

    def since(self, mark: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= mark]

    def wait_for(self, kinds: Callable[[Outcome], bool], mark: float, timeout: float, what: str) -> None:
        """Until, among calls started after ``mark``, each protocol has one outcome that ``kinds`` accepts."""
        try:
            wait_until(lambda: {o.kind for o in self.since(mark) if kinds(o)} == {"http", "grpc"}, timeout, what)
        except TimeoutError as e:
            seen = collections.Counter((o.kind, o.result) for o in self.since(mark))
            raise TimeoutError(f"{e}; calls since: {dict(seen)}") from None

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _http(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if connection is None:
                connection = http.client.HTTPConnection(HOST, self.proc.port, timeout=HANG)
            started = time.monotonic()
            try:
                connection.request("POST", INFER_PATH, HTTP_BODY, {"Content-Type": "application/json"})
                response = connection.getresponse()
                body = response.read()
            except TimeoutError:
                result, shape_ok = "hung", True
            except (OSError, http.client.HTTPException) as e:
                result, shape_ok = f"error: {type(e).__name__}", True
            else:
                result = str(response.status)
                shape_ok = response.status == 200 or "error" in orjson.loads(body)
                if not response.will_close:
                    self._record(Outcome("http", result, started, time.monotonic() - started, shape_ok))
                    continue
            self._record(Outcome("http", result, started, time.monotonic() - started, shape_ok))
            connection.close()
            connection = None
        if connection is not None:
            connection.close()

    def _grpc(self) -> None:
        message = grpc_body()
        with grpc.insecure_channel(self.proc.grpc_url) as channel:
            infer = channel.unary_unary(INFER_METHOD)
            while not self._stop.is_set():
                started = time.monotonic()
                future = infer.future(message)
                try:
                    future.result(timeout=HANG)
                    result = "OK"
                except grpc.FutureTimeoutError:
                    future.cancel()
                    result = "hung"
                except grpc.RpcError as e:
                    result = e.code().name
                self._record(Outcome("grpc", result, started, time.monotonic() - started))


def assert_all_answered(outcomes: list[Outcome]) -> None:
    """Every call got an answer its client understands, in time."""
    assert outcomes
    late = [o for o in outcomes if o.took > BOUND]
    assert not late, f"{len(late)} of {len(outcomes)} calls took longer than {BOUND} s: {late[:5]}"
    odd = [o for o in outcomes if o.result not in (HTTP_ANSWERS if o.kind == "http" else GRPC_ANSWERS)]
    assert not odd, f"unexpected outcomes: {odd[:5]}"
    shapeless = [o for o in outcomes if not o.shape_ok]
    assert not shapeless, f"error answers not in the upstream's shape: {shapeless[:5]}"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def livez_seconds(proc: SidecarProcess) -> float:
    """How long the admin port takes to answer /livez 200 (HANG when it does not)."""
    started = time.monotonic()
    status = http_status(proc.admin_port, "/livez", timeout=HANG)
    return time.monotonic() - started if status == 200 else HANG


def watch(proc: SidecarProcess, seconds: float) -> tuple[float, float]:
    """(CPU seconds per second, slowest /livez) over ``seconds``, asking /livez all along."""
    cpu_before, started, slowest = cpu_seconds(proc.pid or 0), time.monotonic(), 0.0
    while time.monotonic() - started < seconds:
        slowest = max(slowest, livez_seconds(proc))
        time.sleep(0.05)  # paces the probes of this measurement, not a wait for a condition
    return (cpu_seconds(proc.pid or 0) - cpu_before) / (time.monotonic() - started), slowest


def readyz(proc: SidecarProcess) -> int | None:
    return http_status(proc.admin_port, "/readyz", timeout=LIVEZ_BOUND * 4)


def freeze(triton: TritonServer) -> None:
    os.killpg(triton.pid or 0, signal.SIGSTOP)


def thaw(triton: TritonServer) -> None:
    if triton.running:
        os.killpg(triton.pid or 0, signal.SIGCONT)


def broken(triton: TritonServer) -> bool:
    """Triton exited, or its HTTP port refuses connections (not merely slow to answer)."""
    if not triton.running:
        return True
    try:
        with socket.create_connection((HOST, triton.http_port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def failed(o: Outcome) -> bool:
    return not o.ok


def succeeded(o: Outcome) -> bool:
    return o.ok


@dataclass
class Rig:
    triton: TritonServer
    proc: SidecarProcess


@pytest.fixture(scope="module")
def shared_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("faults")
    triton = TritonServer(MODELS_DIR, work / "triton", models=[MODEL]).start()
    settings = {
        "upstream.timeout": TIMEOUT, "upstream.connect_timeout": CONNECT_TIMEOUT,
        "upstream.health_interval": HEALTH_INTERVAL, "upstream.grpc_url": triton.grpc_url,
        "log_level": "warning", "shutdown_delay": 0,
    }
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    proc = SidecarProcess(triton.url, work, "triton", args)
    try:
        proc.start()
        yield Rig(triton, proc)
    finally:
        thaw(triton)
        try:
            proc.stop(timeout=10)
        finally:
            triton.stop()


@pytest.fixture()
def rig(shared_rig: Rig) -> Rig:
    """The shared rig, healthy: Triton running and resumed, the sidecar ready."""
    thaw(shared_rig.triton)
    if broken(shared_rig.triton):
        shared_rig.triton.kill()
        shared_rig.triton.start()
    wait_until(lambda: readyz(shared_rig.proc) == 200, RECOVERY, "the sidecar ready")
    return shared_rig


def server_down(rig: Rig, load: Load, fault: Callable[[TritonServer], object]) -> float:
    """Apply ``fault`` while both protocols succeed; returns, once the sidecar says not ready and each protocol
    has seen a failure, the moment it said not ready."""
    load.wait_for(succeeded, time.monotonic(), RECOVERY, "calls succeeding before the fault")
    at = time.monotonic()
    fault(rig.triton)
    wait_until(lambda: readyz(rig.proc) == 503, NOT_READY_WITHIN, "/readyz 503 with the server down")
    known = time.monotonic()
    load.wait_for(failed, at, HANG, "failed calls with the server down")
    return known


def server_back(rig: Rig, load: Load) -> float:
    """The sidecar is ready again and both protocols succeed, for calls started after it said so; returns the
    seconds from ready to calls of both protocols succeeding.

    Triton itself sometimes breaks as it resumes from SIGSTOP (its python backend crashes, SIGSEGV, or it
    aborts on a lock and hangs with its ports closed): a fault of the model server, which the sidecar must
    outlive like any other; the server is then started again."""
    deadline = time.monotonic() + RECOVERY
    while (took := Recovery(rig, load).wait(deadline)) is None:
        rig.triton.kill()
        rig.triton.start()
    return took


class Recovery:
    """Waits for the sidecar to say ready, then for calls of both protocols to succeed; or for Triton to break."""

    def __init__(self, rig: Rig, load: Load) -> None:
        self.rig = rig
        self.load = load
        self.ready_at = 0.0

    def wait(self, deadline: float) -> float | None:
        """Seconds from ready to both protocols succeeding; None when Triton broke meanwhile."""
        try:
            wait_until(self._done, deadline - time.monotonic(), "the sidecar ready, calls succeeding")
        except TimeoutError as e:
            seen = collections.Counter((o.kind, o.result) for o in self.load.since(self.ready_at or deadline))
            raise TimeoutError(f"{e}; ready: {bool(self.ready_at)}; calls since: {dict(seen)}") from None
        return None if broken(self.rig.triton) else time.monotonic() - self.ready_at

    def _done(self) -> bool:
        if broken(self.rig.triton):
            return True
        if not self.ready_at:
            if readyz(self.rig.proc) == 200:
                self.ready_at = time.monotonic()
            return False
        return {o.kind for o in self.load.since(self.ready_at) if o.ok} == {"http", "grpc"}


def assert_idle_and_live(rig: Rig) -> None:
    cpu, slowest = watch(rig.proc, 1.5)
    assert slowest < LIVEZ_BOUND, f"/livez took {slowest:.3f} s"
    assert cpu < FROZEN_CPU, f"the sidecar used {cpu:.2f} s of CPU per second while the server was frozen"


def test_a_frozen_server_times_out_callers_and_the_sidecar_idles(rig: Rig) -> None:
    with Load(rig.proc) as load:
        server_down(rig, load, freeze)
        try:
            assert_idle_and_live(rig)
        finally:
            thaw(rig.triton)
        server_back(rig, load)
    assert_all_answered(load.outcomes)


def test_a_frozen_then_resumed_server_serves_again(rig: Rig) -> None:
    with Load(rig.proc) as load:
        server_down(rig, load, freeze)
        thaw(rig.triton)
        server_back(rig, load)
        assert livez_seconds(rig.proc) < LIVEZ_BOUND
    assert_all_answered(load.outcomes)


def test_a_killed_server_fails_callers_fast_and_recovers_on_restart(rig: Rig) -> None:
    with Load(rig.proc) as load:
        known = server_down(rig, load, TritonServer.kill)
        _, slowest = watch(rig.proc, DEAD_FOR)
        assert slowest < LIVEZ_BOUND, f"/livez took {slowest:.3f} s"
        slow = [o for o in load.since(known) if o.took > CONNECT_TIMEOUT + 0.5]
        assert not slow, f"calls to a dead server must fail fast: {slow[:5]}"
        rig.triton.start()
        assert server_back(rig, load) < RECONNECTED_WITHIN
        assert livez_seconds(rig.proc) < LIVEZ_BOUND
    assert_all_answered(load.outcomes)


def test_frozen_resumed_killed_restarted(rig: Rig) -> None:
    """The sequence reported: freeze, resume, kill, and a new server on the same ports."""
    with Load(rig.proc) as load:
        server_down(rig, load, freeze)
        assert_idle_and_live(rig)
        thaw(rig.triton)
        server_back(rig, load)
        server_down(rig, load, TritonServer.kill)
        assert livez_seconds(rig.proc) < LIVEZ_BOUND
        rig.triton.start()
        server_back(rig, load)
        assert livez_seconds(rig.proc) < LIVEZ_BOUND
    assert_all_answered(load.outcomes)


# -- the root cause, on its own ----------------------------------------------------------------------------

# A want left behind for a model the loader cannot load (warm, being loaded, queued for the warm-up, failed,
# or forgotten when the server restarted) once made OnDemandLoader.run loop without ever awaiting: the event
# loop stopped, and with it every port, the admin port included. After a restart (or a resume that the monitor
# saw as one) callers want the models the warm-up is loading; once it ends, the wants remain.
LOADER_SCRIPT = """
import asyncio, sys
from sidecar.config import ModelsConfig
from sidecar.loading.book import ModelBook, ModelState
from sidecar.control.ondemand import OnDemandLoader

class Monitor:
    protocol = "triton"
    warming = False

async def main(case):
    book = ModelBook()
    book.track(["m"])
    book.want("m")
    if case == "forgotten":
        book.forget_all()
    else:
        book.set("m", ModelState(case))
    loader = asyncio.create_task(OnDemandLoader(ModelsConfig(), None, book, Monitor()).run())
    await asyncio.sleep(0.2)  # returns only if the loader lets the loop run
    loader.cancel()

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("case", ["warm", "loading", "warming", "queued", "failed", "forgotten"])
def test_the_on_demand_loader_waits_when_no_wanted_model_can_be_loaded(case: str) -> None:
    try:
        subprocess.run([sys.executable, "-c", LOADER_SCRIPT, case], timeout=8, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the on-demand loader spun without yielding to the event loop ({case} model wanted)")

