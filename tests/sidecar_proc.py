"""Runs the real ``sidecar run`` command as a child process, for tests, bench and demo.

A real process (not an in-process app) so that SIGTERM, exit status and the
command line are exercised exactly as a user would run them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from tests.servers import HOST, ServerProcess, _clean_environment, free_ports, wait_until
from tests.servers import http_status as _port_status
from tests.wire import exchange

__all__ = ["SidecarProcess", "http_status", "wait_until"]


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """Status of a GET on a full URL, or None when nothing answers."""
    parts = urlsplit(url)
    try:
        return exchange(f"{parts.scheme}://{parts.netloc}", "GET", parts.path or "/", timeout=timeout).status
    except OSError:
        return None


class SidecarProcess(ServerProcess):
    """``sidecar run`` in front of ``upstream``; ready means the admin port says ``/readyz`` 200.

    ``wait="listening"`` makes ``start()`` return as soon as the admin port answers at all.
    """

    name = "sidecar"
    stop_timeout = 60.0

    def __init__(
        self,
        upstream: str,
        workdir: str | Path,
        protocol: str = "auto",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        wait: str = "ready",
    ) -> None:
        port, self.admin_port, self.grpc_port = free_ports(3)
        super().__init__(workdir, port)
        self.upstream = upstream
        self.protocol = protocol
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.wait = wait
        # Run under another program, e.g. ["prlimit", "--nofile=1024:1024", "--"].
        self.command_prefix: list[str] = []
        self.url = f"http://{HOST}:{port}"
        self.admin_url = f"http://{HOST}:{self.admin_port}"
        # The gRPC data port: a free one, never the default 9001, as tests run sidecars side by side.
        self.grpc_url = f"{HOST}:{self.grpc_port}"
        self._log_checked = 0  # the log's bytes already searched for tracebacks

    def command(self) -> list[str]:
        return [
            *self.command_prefix,
            sys.executable,
            "-P",  # the working directory is not on sys.path: a folder there named "sidecar" must not shadow us
            "-m",
            "sidecar",
            "run",
            "--upstream",
            self.upstream,
            "--protocol",
            self.protocol,
            "--listen",
            f"{HOST}:{self.port}",
            "--admin",
            f"{HOST}:{self.admin_port}",
            # Each sidecar its own traffic memory unless told otherwise: runs must not replay each other's calls.
            *([] if "--store" in self.extra_args else ["--store", str(self.workdir / f"traffic-{self.port}.db")]),
            *([] if any(a.startswith("grpc_listen=") for a in self.extra_args) else
              ["--set", f"grpc_listen={self.grpc_url}"]),
            # One process unless a test asks for workers: the product's default (auto) would follow this machine.
            *([] if any(a.startswith("workers=") for a in self.extra_args) else ["--set", "workers=1"]),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        return {**_clean_environment(), **self.env}

    def is_ready(self) -> bool:
        path = "/readyz" if self.wait == "ready" else "/livez"
        return _port_status(self.admin_port, path) == 200

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: _port_status(self.admin_port, "/readyz") == 200, timeout, "sidecar /readyz 200")

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait for the exit status (what Kubernetes does at pod shutdown)."""
        return self.stop(timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """As ServerProcess.stop; then the log must hold no traceback: whatever a test did, the sidecar
        says what went wrong in a line, and that holds at exit too (its own or the interpreter's)."""
        code = super().stop(timeout)
        if self.log_path.exists():
            with self.log_path.open("rb") as log:
                log.seek(self._log_checked)
                new = log.read()
            self._log_checked += len(new)
            if b"Traceback" in new:
                at = new.index(b"Traceback")
                raise AssertionError(f"a traceback in {self.log_path}:\n"
                                     f"{new[max(0, at - 300):at + 1500].decode(errors='replace')}")
        return code
