"""wrk (Debian) as the load generator, and HAProxy as the reference proxy."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.servers import ServerProcess, free_ports, http_status

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class WrkResult:
    rps: float
    p50: float  # seconds
    p99: float
    requests: int
    errors: int

    def row(self, name: str) -> str:
        return f"| {name} | {self.rps:,.0f} | {self.p50 * 1e3:.2f} | {self.p99 * 1e3:.2f} | {self.errors} |"


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, body: bytes, connections: int = 16, seconds: float = 10, threads: int = 1) -> WrkResult:
    """POST ``body`` to ``url`` with wrk; parse throughput and latency percentiles."""
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
        )
        return run_wrk_script(url, script, connections, seconds, threads)


def run_wrk_script(url: str, script: Path, connections: int = 16, seconds: float = 10, threads: int = 1,
                   timeout: float | None = None) -> WrkResult:
    """wrk driven by a Lua ``script`` against ``url``; ``timeout``: wrk's per-request timeout (default 2 s)."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    if timeout is not None:
        command.append(f"--timeout={max(1, round(timeout))}s")
    out = subprocess.run([*command, "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    """Throughput, p50/p99 and errors (non-2xx answers plus socket errors) from wrk's --latency report."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _seconds(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return WrkResult(rps, p50, p99, requests, errors)


class HAProxy(ServerProcess):
    """Debian's haproxy in HTTP mode with keep-alive both sides, the usual reference proxy."""

    name = "haproxy"

    def __init__(self, workdir: str | Path, backend: str) -> None:
        (port,) = free_ports(1)
        super().__init__(workdir, port)
        self.backend = backend.removeprefix("http://")
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = self.workdir / f"haproxy-{port}.cfg"
        self.config_path.write_text(
            "global\n  maxconn 4096\n"
            "defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n"
            "  option http-keep-alive\n"
            f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n"
            f"backend be\n  http-reuse always\n  server s1 {self.backend} maxconn 256\n"
        )

    def command(self) -> list[str]:
        return [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(self.config_path)]

    def is_ready(self) -> bool:
        return http_status(self.port, "/v2/health/live") == 200
