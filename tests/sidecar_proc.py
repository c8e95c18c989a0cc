"""Runs the real ``sidecar run`` command as a child process, for tests, bench and demo.

A real process (not an in-process app) so that SIGTERM, exit status and the
command line are exercised exactly as a user would run them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """Status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, urllib.error.URLError):
        return None


def poll_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Re-check ``predicate`` until it holds; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class SidecarProcess:
    def __init__(
        self,
        upstream: str,
        workdir: Path,
        protocol: str = "auto",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.upstream = upstream
        self.protocol = protocol
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"sidecar-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sidecar", "run",
            "--upstream", self.upstream,
            "--protocol", self.protocol,
            "--listen", f"127.0.0.1:{self.port}",
            "--admin", f"127.0.0.1:{self.admin_port}",
            *self.extra_args,
        ]

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> SidecarProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the child's lifetime
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        else:
            self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = 30.0) -> None:
        poll_until(lambda: self._alive() and http_status(self.admin_url + "/livez") == 200, timeout,
                   f"sidecar admin port ({self.log_tail()})")

    def wait_ready(self, timeout: float = 30.0) -> None:
        poll_until(lambda: self._alive() and http_status(self.admin_url + "/readyz") == 200, timeout,
                   f"sidecar /readyz 200 ({self.log_tail()})")

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"sidecar exited: {self.log_tail()}")
        return True

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
