"""Real load balancers in front of sidecar replicas, from the configurations shipped in k8s/.

``HAProxyLB`` and ``NginxLB`` render ``k8s/haproxy/haproxy.cfg`` and ``k8s/nginx/nginx.conf``:
everything the documentation shows is kept; only what differs between a cluster and this machine
is replaced (pod addresses, listen address, file paths), and each replacement is checked to hit
exactly the line it means. ``Traffic`` is a few client threads on keep-alive connections that
record every answer; ``Replica`` is one Triton with its sidecar.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tests.servers import HOST, REPO_ROOT, ServerProcess, TritonServer, free_ports, http_status
from tests.sidecar_proc import SidecarProcess

HAPROXY_CFG = REPO_ROOT / "k8s" / "haproxy" / "haproxy.cfg"
NGINX_CONF = REPO_ROOT / "k8s" / "nginx" / "nginx.conf"
MODEL = "identity_fp32"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
BODY = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]}]})


def _replace_line(text: str, starts: str, new: str) -> str:
    """``text`` with its one line whose stripped form starts with ``starts`` replaced by ``new``."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.strip().startswith(starts)]
    assert len(hits) == 1, f"expected one line starting {starts!r}, found {len(hits)}"
    indent = lines[hits[0]][: len(lines[hits[0]]) - len(lines[hits[0]].lstrip())]
    lines[hits[0]: hits[0] + 1] = [indent + n if n else n for n in new.splitlines()]
    return "\n".join(lines) + "\n"


# -- replicas -------------------------------------------------------------------------------------

SEED_DELAY = 0.4  # seconds per call of the seeded `slow` model: a warm-up pass of 4 calls takes ~1.6 s


def warming_args(policy: str, workdir: Path) -> list[str]:
    """Sidecar settings whose every warm-up takes a few seconds in two passes (progress 0, then 0.5,
    then warm): one seed call of the `slow` model, stacked to batch sizes 2, 4 and 8, replayed one at
    a time; recording off so every warm-up replays the same plan. No shutdown delay: tests end fast."""
    seeds = workdir / "seeds" / "slow"
    seeds.mkdir(parents=True, exist_ok=True)
    (seeds / "one.json").write_bytes(orjson.dumps({
        "inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]}],
        "parameters": {"delay": SEED_DELAY}}))
    settings = {"record.enabled": "false", "warmup.seeds": seeds.parent, "warmup.concurrency": 1,
                "upstream.health_interval": 0.25, "gate.policy": policy, "shutdown_delay": 0}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]



@dataclass
class Replica:
    """One pod: its own Triton and a sidecar in front with the HAProxy agent port open."""

    triton: TritonServer
    sidecar: SidecarProcess
    agent_port: int

    @classmethod
    def build(cls, workdir: Path, name: str, sidecar_args: list[str]) -> Replica:
        triton = TritonServer(workdir=workdir / f"{name}-triton", models=[MODEL, "slow"])
        (agent_port,) = free_ports(1)
        args = [*sidecar_args, "--set", f"mesh.agent_listen={HOST}:{agent_port}"]
        sidecar = SidecarProcess(triton.url, workdir / f"{name}-sidecar", "triton", args, wait="listening")
        return cls(triton, sidecar, agent_port)

    def ready(self) -> bool:
        return http_status(self.sidecar.admin_port, "/readyz") == 200

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """The sidecar's /metrics as (name, labels, value) series."""
        conn = http.client.HTTPConnection(HOST, self.sidecar.admin_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out = []
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                name, _, labels = series.partition("{")
                out.append((name, dict(_LABEL.findall(labels)), float(value)))
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the series of ``name`` that carry ``labels`` (in whatever order they are written)."""
        return sum(v for n, have, v in self.metrics() if n == name and labels.items() <= have.items())

    def state(self) -> tuple[str, float]:
        """(state, warm-up progress), from the gauges the state machine exports."""
        series = self.metrics()
        state = next(labels["state"] for n, labels, v in series if n == "sidecar_state" and v == 1.0)
        return state, next(v for n, _, v in series if n == "sidecar_warmup_progress")

    def served(self) -> int:
        """Inference calls this sidecar answered 200 (its own count)."""
        return int(self.metric("sidecar_requests_total", route="infer", model=MODEL, status="200"))


@contextlib.contextmanager
def replicas(workdir: Path, count: int, sidecar_args: list[str]) -> Iterator[list[Replica]]:
    """``count`` replicas, started side by side, each ready (warm) when this yields."""
    built = [Replica.build(workdir, f"r{i + 1}", sidecar_args) for i in range(count)]
    with contextlib.ExitStack() as stack:
        starting = [threading.Thread(target=r.triton.start) for r in built]
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        stack.callback(_all, [r.triton.stop for r in built])
        for r in built:
            if not r.triton.running:
                raise RuntimeError(f"Triton did not start: {r.triton.log_tail()}")
        stack.callback(_all, [r.sidecar.stop for r in built])  # before the Tritons: LIFO
        for r in built:
            r.sidecar.start()
        for r in built:
            r.sidecar.wait_until_ready(60)
        yield built


def _all(stops: list[Callable[[], object]]) -> None:
    """Stops servers side by side: shutting down one at a time would only add up their waits."""
    threads = [threading.Thread(target=stop) for stop in stops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- client traffic -------------------------------------------------------------------------------


@dataclass
class Traffic:
    """``threads`` clients calling ``url`` back to back until stopped; every answer is kept."""

    url_port: int
    threads: int = 4
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, x-sidecar-state)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(30)

    def count(self) -> int:
        return len(self.answers)

    def errors(self) -> list[tuple[float, int, str]]:
        return [a for a in self.answers if a[1] != 200]

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection(HOST, self.url_port, timeout=30)
            try:
                while not self._stop.is_set():  # one keep-alive connection for as long as it lasts
                    conn.request("POST", f"/v2/models/{MODEL}/infer", BODY, {"Content-Type": "application/json"})
                    answer = conn.getresponse()
                    answer.read()
                    self.answers.append((time.monotonic(), answer.status, answer.getheader("x-sidecar-state") or ""))
                    if answer.getheader("connection", "").lower() == "close":
                        break
            except (OSError, http.client.HTTPException):
                # A client-visible failure too: the balancer closed on us without an answer.
                self.answers.append((time.monotonic(), 0, ""))
            finally:
                conn.close()


# -- HAProxy --------------------------------------------------------------------------------------


def render_haproxy(template: str, servers: list[Replica]) -> str:
    """The shipped file with the DNS-discovered servers replaced by explicit ones (same defaults)."""
    lines = "\n".join(f"server r{i + 1} {HOST}:{r.sidecar.port} port {r.sidecar.admin_port} agent-port {r.agent_port}"
                      for i, r in enumerate(servers))
    text = _replace_line(template, "server-template ", lines)
    # The resolvers section only serves the server-template line (no cluster DNS here).
    start = text.index("\nresolvers kube\n")
    end = text.index("\n\n", start + 1)
    return text[:start] + text[end:]


class HAProxyLB(ServerProcess):
    """Debian's haproxy running the rendered k8s/haproxy/haproxy.cfg; ``stats()`` reads its socket."""

    name = "haproxy"

    def __init__(self, workdir: Path, servers: list[Replica]) -> None:
        (port,) = free_ports(1)
        super().__init__(workdir, port)
        self.url = f"http://{HOST}:{port}"
        self.socket_path = self.workdir / f"haproxy-{port}.sock"
        self.config_path = self.workdir / f"haproxy-{port}.cfg"
        self.config_path.write_text(render_haproxy(HAPROXY_CFG.read_text(), servers))

    def command(self) -> list[str]:
        return [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        # The shipped file reads these (with cluster defaults): HAProxy expands them itself.
        return {**super().environment(), "HAPROXY_BIND": f"{HOST}:{self.port}",
                "HAPROXY_STATS_SOCKET": str(self.socket_path)}

    def is_ready(self) -> bool:
        try:
            return bool(self.stats())
        except OSError:
            return False

    def command_line(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: {server name: {column: value}}."""
        lines = self.command_line("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r["pxname"] == "triton" and r["svname"] not in ("BACKEND",)}


# -- Nginx ----------------------------------------------------------------------------------------


def render_nginx(template: str, servers: list[Replica], port: int, workdir: Path) -> str:
    text = template
    params = next(line.strip() for line in text.splitlines() if line.strip().startswith("server triton-pods"))
    params = params.split(None, 2)[2]  # "max_fails=... fail_timeout=...;" as documented
    text = _replace_line(text, "server triton-pods",
                         "\n".join(f"server {HOST}:{r.sidecar.port} {params}" for r in servers))
    text = _replace_line(text, "listen 8000;", f"listen {HOST}:{port};")
    # Paths of this machine's Debian build point at /var; the test keeps its files to itself.
    local = "\n".join([
        "http {",
        "    access_log off;",
        *(f"    {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
    ])
    return _replace_line(text, "http {", local)


class NginxLB(ServerProcess):
    """Debian's nginx running the rendered k8s/nginx/nginx.conf in the foreground."""

    name = "nginx"

    def __init__(self, workdir: Path, servers: list[Replica]) -> None:
        (port,) = free_ports(1)
        super().__init__(workdir, port)
        self.url = f"http://{HOST}:{port}"
        self.config_path = self.workdir / f"nginx-{port}.conf"
        self.config_path.write_text(render_nginx(NGINX_CONF.read_text(), servers, port, self.workdir))

    def command(self) -> list[str]:
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(self.workdir), "-c", str(self.config_path),
                "-g", f"daemon off; pid {self.workdir / 'nginx.pid'}; error_log stderr notice;"]

    def is_ready(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
            return True
        return False
