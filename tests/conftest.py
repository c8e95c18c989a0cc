"""Session fixtures: one real Triton, one real KServe ModelServer, and sidecars in front.

Tests that kill or restart a server start their own, so they never disturb these.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import MODELS_DIR, KServeServer, RedisServer, TritonServer
from tests.sidecar_proc import SidecarProcess


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(MODELS_DIR, tmp_path_factory.mktemp("triton")) as server:
        yield server


@pytest.fixture(scope="session")
def sidecar(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    with SidecarProcess(triton.url, tmp_path_factory.mktemp("sidecar"), protocol="triton") as proc:
        yield proc


@pytest.fixture(scope="session")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeServer]:
    with KServeServer(tmp_path_factory.mktemp("kserve")) as server:
        yield server


@pytest.fixture(scope="session")
def kserve_sidecar(kserve: KServeServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    args = ["--set", f"upstream.models={kserve.model}"]
    with SidecarProcess(kserve.url, tmp_path_factory.mktemp("ks-sidecar"), "tfserving", args) as proc:
        yield proc


@pytest.fixture()
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
