"""Launchers for the real servers that tests, benchmarks and demos run: Triton, KServe, Redis.

Each launcher picks free ports once, when it is built, so ``start()`` after ``stop()`` or ``kill()``
comes back on the same ports (restart tests). ``start()`` returns only once the server answers its
health check, waiting on that condition with a deadline. Output goes to ``<workdir>/<name>-<port>.log``
(appended to across restarts). Each server runs in a process group of its own, so ``kill()`` also
takes down its children (Triton's python-backend stubs), like a crashed container would.

    with TritonServer(MODELS_DIR, tmp_path) as triton:
        ...  # triton.url, triton.grpc_url
        triton.kill()
        triton.start()

The servers come from ``scripts/setup-servers.sh``: ``.venv-triton`` and ``.venv-kserve`` in the
repository root, or the venvs named by ``SIDECAR_TRITON_VENV`` / ``SIDECAR_KSERVE_VENV``; Redis is
Debian's ``redis-server`` (or ``SIDECAR_REDIS_SERVER``). This module imports only the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

__all__ = [
    "HOST",
    "KSERVE_MODEL",
    "MODELS_DIR",
    "REPO_ROOT",
    "KServeServer",
    "RedisServer",
    "ServerExited",
    "ServerProcess",
    "TritonServer",
    "free_ports",
    "http_status",
    "kserve_venv",
    "redis_ping",
    "triton_venv",
    "wait_until",
    "wait_until_async",
]

T = TypeVar("T")

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
MODELS_DIR = TESTS_DIR / "models"
KSERVE_SCRIPT = TESTS_DIR / "kserve_server.py"
KSERVE_MODEL = "tfmodel"
SETUP_HINT = "run scripts/setup-servers.sh first"
# Python variables of the caller that must not leak into a server's own interpreter.
PYTHON_ENV_VARS = ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONSTARTUP")


class ServerExited(RuntimeError):
    """The server process ended while it was expected to start or run."""


# -- waiting ----------------------------------------------------------------------------------------


def _pauses(first: float = 0.005, most: float = 0.1) -> Iterator[float]:
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, most)


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "condition") -> T:
    """Returns the first truthy value of ``predicate()``; raises TimeoutError after ``timeout`` seconds.

    Checks often at first, then every 0.1 s at most. Exceptions from the predicate propagate.
    """
    deadline = time.monotonic() + timeout
    for pause in _pauses():
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} not met within {timeout:.1f} s")
        time.sleep(min(pause, remaining))
    raise AssertionError("unreachable")


async def wait_until_async(
    predicate: Callable[[], Awaitable[T]], timeout: float, what: str = "condition"
) -> T:
    """``wait_until`` for event loops, with an async predicate."""
    deadline = time.monotonic() + timeout
    for pause in _pauses():
        value = await predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} not met within {timeout:.1f} s")
        await asyncio.sleep(min(pause, remaining))
    raise AssertionError("unreachable")


# -- small probes -----------------------------------------------------------------------------------


def _listening_ports() -> range:
    """Ports below the kernel's ephemeral range, a share of them for each test process. A port the kernel picks
    for bind(0) comes from the ephemeral range, where every outgoing connection of every process also takes its
    local port: between choosing it and the server binding it, a client elsewhere could take it ("address
    already in use"). Below that range only listeners bind, and each xdist worker has a span of its own."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slot = int(worker) % 8 if worker.isdigit() else 0
    span = max(256, (ephemeral - 10000) // 8)
    start = ephemeral - (slot + 1) * span
    return range(start, start + span)


_PORTS = _listening_ports()
_port_cursor = itertools.count(os.getpid() % len(_PORTS))  # another run's servers may still hold the first ones


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on HOST right now (all sockets are held until all are chosen), from this
    process's own span below the ephemeral range (see ``_listening_ports``)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(len(_PORTS)):
            if len(ports) == count:
                return ports
            port = _PORTS[next(_port_cursor) % len(_PORTS)]
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((HOST, port))
            except OSError:
                continue  # in use (or lingering in TIME_WAIT): the next one
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports in {_PORTS}")


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """Status of ``GET http://HOST:port/path``, or None when nothing answers (no proxies involved)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# -- locating the installed servers -----------------------------------------------------------------


def triton_venv() -> Path:
    return Path(os.environ.get("SIDECAR_TRITON_VENV", REPO_ROOT / ".venv-triton"))


def kserve_venv() -> Path:
    return Path(os.environ.get("SIDECAR_KSERVE_VENV", REPO_ROOT / ".venv-kserve"))


def _venv_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"no Python venv at {venv}: {SETUP_HINT}")
    return python


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise FileNotFoundError(f"no site-packages in {venv}: {SETUP_HINT}")
    return found[0]


@functools.cache
def _python_libdir(python: Path) -> str:
    """The interpreter's own LIBDIR: its libpython must win over the system's (docs/architecture.md)."""
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def _clean_environment() -> dict[str, str]:
    environment = dict(os.environ)
    for name in PYTHON_ENV_VARS:
        environment.pop(name, None)
    return environment


def _prepend_path(environment: dict[str, str], name: str, *entries: str | Path) -> None:
    existing = environment.get(name, "")
    environment[name] = os.pathsep.join([*map(str, entries), *([existing] if existing else [])])


# -- the process wrapper ----------------------------------------------------------------------------


class ServerProcess:
    """One server process: start (and wait until ready), stop (graceful), kill (SIGKILL), restart.

    Subclasses give ``command()``, ``is_ready()``, a ``port`` for the log name and optionally
    ``environment()``. ``url`` is the HTTP (or Redis) URL, ``grpc_url`` a gRPC target or None.
    """

    name = "server"
    ready_timeout = 30.0
    stop_timeout = 30.0
    url: str
    grpc_url: str | None = None

    def __init__(self, workdir: str | Path, port: int) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = self.workdir / f"{self.name}-{port}.log"
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    # hooks
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return _clean_environment()

    def is_ready(self) -> bool:
        raise NotImplementedError

    def _after_exit(self) -> None:
        """Cleans up what a dead process leaves behind."""

    # state
    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # lifecycle
    def start(self, timeout: float | None = None) -> Self:
        """Starts the process and returns once ``is_ready()``; kills it again if that does not happen."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self._process = self._spawn()
        self.starts += 1
        try:
            self.wait_ready(self.ready_timeout if timeout is None else timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        try:
            wait_until(self._ready_while_alive, timeout, what=f"{self.name} ready")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; log {self.log_path}:\n{self.log_tail()}") from None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds for a clean exit, else SIGKILL. Returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self.stop_timeout if timeout is None else timeout)
        return self._reap(process)

    def kill(self) -> int | None:
        """SIGKILL to the whole process group, like a crash; returns the exit code."""
        process = self._process
        return None if process is None else self._reap(process)

    def restart(self, timeout: float | None = None) -> Self:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else f"exited={self.returncode}"
        return f"<{type(self).__name__} {self.url} {state} starts={self.starts} log={self.log_path}>"

    # internals
    def _spawn(self) -> subprocess.Popen[bytes]:
        command = self.command()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(command)}\n".encode())
            log.flush()
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
                start_new_session=True,
            )

    def _ready_while_alive(self) -> bool:
        process = self._process
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            raise ServerExited(f"{self.name} exited with {code}; log {self.log_path}:\n{self.log_tail()}")
        return self.is_ready()

    def _reap(self, process: subprocess.Popen[bytes]) -> int:
        """SIGKILLs what is left of the process group and waits for the leader."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
        self._after_exit()
        return code


# -- Triton -----------------------------------------------------------------------------------------


class TritonServer(ServerProcess):
    """The real Triton server from the ``nvidia-pytriton`` wheel, on CPU, with the python backend.

    ``models=None`` loads the whole repository (model control mode NONE); a list starts in EXPLICIT
    mode with just those models loaded (an empty list loads none; load more via the repository API).
    """

    name = "triton"
    ready_timeout = 60.0

    def __init__(
        self,
        model_repository: str | Path = MODELS_DIR,
        workdir: str | Path = ".",
        models: Iterable[str] | None = None,
        extra_args: Sequence[str] = (),
        venv: str | Path | None = None,
    ) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        super().__init__(workdir, self.http_port)
        self.model_repository = Path(model_repository).resolve()
        self.models = None if models is None else list(models)
        self.extra_args = list(extra_args)
        self.venv = Path(venv) if venv is not None else triton_venv()
        self.url = f"http://{HOST}:{self.http_port}"
        self.grpc_url = f"{HOST}:{self.grpc_port}"
        self.metrics_url = f"http://{HOST}:{self.metrics_port}/metrics"
        # Names this server's python-backend shared-memory regions in /dev/shm, to clean up after kill().
        self.shm_prefix = f"sidecar_test_{uuid.uuid4().hex[:12]}_"

    @property
    def server_dir(self) -> Path:
        return _site_packages(self.venv) / "pytriton" / "tritonserver"

    def command(self) -> list[str]:
        server_dir = self.server_dir
        binary = server_dir / "bin" / "tritonserver"
        if not binary.exists():
            raise FileNotFoundError(f"no Triton binary at {binary}: {SETUP_HINT}")
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={server_dir / 'backends'}",
            f"--cache-directory={server_dir / 'caches'}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            *self._model_control_args(),
            *self.extra_args,
        ]

    def _model_control_args(self) -> list[str]:
        if self.models is None:
            return []
        return ["--model-control-mode=explicit", *(f"--load-model={model}" for model in self.models)]

    def environment(self) -> dict[str, str]:
        """docs/architecture.md: the venv interpreter's LIBDIR, then the wheel's libraries; the venv's bin on PATH."""
        python = _venv_python(self.venv)
        environment = _clean_environment()
        libs = _site_packages(self.venv) / "nvidia_pytriton.libs"
        _prepend_path(environment, "LD_LIBRARY_PATH", _python_libdir(python), libs)
        _prepend_path(environment, "PATH", self.venv / "bin")
        return environment

    def is_ready(self) -> bool:
        return http_status(self.http_port, "/v2/health/ready") == 200

    def model_ready(self, model: str) -> bool:
        return http_status(self.http_port, f"/v2/models/{model}/ready") == 200

    def model_counts(self, model: str) -> tuple[int, int]:
        """Triton's own (inference_count, execution_count) for ``model``, all versions together."""
        connection = http.client.HTTPConnection(HOST, self.http_port, timeout=10)
        try:
            connection.request("GET", f"/v2/models/{model}/stats")
            stats = json.loads(connection.getresponse().read())["model_stats"]
        finally:
            connection.close()
        return sum(int(s["inference_count"]) for s in stats), sum(int(s["execution_count"]) for s in stats)

    def counts_since(self, model: str, before: tuple[int, int], inferences: int) -> tuple[int, int]:
        """(inferences, executions) of ``model`` since ``before``, once at least ``inferences`` are counted.

        Triton updates its statistics just after it sends the answer, so a read right after the caller
        got it can trail by one; waiting for the count expected (then reading what is there) keeps a
        test from flaking on that, and an extra call still shows as a count above the one expected."""
        def delta() -> tuple[int, int]:
            now = self.model_counts(model)
            return now[0] - before[0], now[1] - before[1]

        wait_until(lambda: delta()[0] >= inferences, 10, f"{inferences} inference(s) of {model} counted")
        return delta()

    def settled_counts(self, model: str, quiet: float = 0.05) -> tuple[int, int]:
        """``model_counts`` once they have held still for ``quiet`` seconds: calls answered just before
        (a warm-up's, say, whose number is not known) are in them by then."""
        seen = (self.model_counts(model), time.monotonic())

        def still() -> tuple[int, int] | None:
            nonlocal seen
            now = self.model_counts(model)
            if now != seen[0]:
                seen = (now, time.monotonic())
                return None
            return now if time.monotonic() - seen[1] >= quiet else None

        return wait_until(still, 10, f"the counts of {model} settled")

    def _after_exit(self) -> None:
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)


# -- KServe (standing in for TF Serving REST) -------------------------------------------------------


class KServeServer(ServerProcess):
    """The real KServe ModelServer running ``tests/kserve_server.py``: model ``tfmodel``, REST v1 only."""

    name = "kserve"
    model = KSERVE_MODEL

    def __init__(self, workdir: str | Path = ".", venv: str | Path | None = None) -> None:
        (port,) = free_ports(1)
        super().__init__(workdir, port)
        self.http_port = port
        self.venv = Path(venv) if venv is not None else kserve_venv()
        self.url = f"http://{HOST}:{port}"
        self.predict_path = f"/v1/models/{self.model}:predict"
        self.predict_url = f"{self.url}{self.predict_path}"

    def command(self) -> list[str]:
        return [
            str(_venv_python(self.venv)),
            str(KSERVE_SCRIPT),
            f"--http_port={self.http_port}",
            "--enable_grpc=false",
            "--enable_latency_logging=false",
        ]

    def environment(self) -> dict[str, str]:
        environment = _clean_environment()
        environment["PYTHONUNBUFFERED"] = "1"
        return environment

    def is_ready(self) -> bool:
        return http_status(self.http_port, f"/v1/models/{self.model}") == 200


# -- Redis ------------------------------------------------------------------------------------------


class RedisServer(ServerProcess):
    """Debian's redis-server on a free port, with persistence off (a restart starts empty)."""

    name = "redis"

    def __init__(self, workdir: str | Path = ".", extra: Sequence[str] = (), port: int | None = None) -> None:
        """``extra``: more redis-server arguments (``--cluster-enabled yes``, ``--replicaof ...``)."""
        super().__init__(workdir, port if port is not None else free_ports(1)[0])
        self.url = f"redis://{HOST}:{self.port}/0"
        self.extra = list(extra)

    def command(self) -> list[str]:
        binary = os.environ.get("SIDECAR_REDIS_SERVER") or shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("no redis-server on PATH: apt-get install redis-server")
        return [
            binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            *self.extra,
        ]  # fmt: skip

    def is_ready(self) -> bool:
        return redis_ping(self.port)
