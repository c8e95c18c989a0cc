"""A model whose files change under the same name and version never has its old answers served.

The model ``scaled`` multiplies its input by a factor read from a file beside it: new files, same
version, same configuration - only its answers tell. A restart on new files must not get the Redis
tier's answers of the old files (the fleet's probe request is asked again: ``cache.fingerprint``), and
a model reloaded in place (repository polling) loses its cached answers once the sidecar sees it
answer otherwise (``cache.verify_interval``).
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawhttp import exchange_raw
from tests.servers import RedisServer, TritonServer, wait_until
from tests.sidecar_proc import SidecarProcess

CONFIG = """backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
MODEL = '''
import pathlib
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = pathlib.Path(args["model_repository"]) / args["model_version"]
        self.factor = float((here / "factor.txt").read_text())

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * self.factor)]))
        return out
'''


def write_model(repo: Path, factor: float) -> None:
    version = repo / "scaled" / "1"
    version.mkdir(parents=True, exist_ok=True)
    (repo / "scaled" / "config.pbtxt").write_text(CONFIG)
    (version / "model.py").write_text(MODEL)
    (version / "factor.txt").write_text(str(factor))


def infer(port: int, value: float) -> tuple[float, str]:
    """(OUTPUT0[0], the sidecar's cache verdict)."""
    head = (b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":4}}],'
            b'"outputs":[{"name":"OUTPUT0","parameters":{"binary_data":true}}]}')
    body = head + struct.pack("<f", value)
    raw = (b"POST /v2/models/scaled/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: %d\r\n"
           b"Content-Length: %d\r\n\r\n" % (len(head), len(body))) + body
    answer = exchange_raw(port, raw)
    assert answer.status == 200, answer.body
    length = int(answer.header(b"inference-header-content-length") or 0)
    return struct.unpack("<f", answer.body[length:length + 4])[0], (answer.header(b"x-sidecar-cache") or b"").decode()


def _args(redis: RedisServer, *extra: str) -> list[str]:
    return ["--set", "cache.models=scaled", "--set", f"cache.redis={redis.url}", "--set", "models.load=off",
            "--set", "upstream.health_interval=0.2", "--set", "shutdown_delay=0", "--set", "log_level=warning",
            *extra]


@pytest.fixture()
def repo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "repo"
    write_model(path, 2.0)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_restart_on_new_files_never_serves_the_old_files_answers(repo: Path, tmp_path: Path,
                                                                   redis_server: RedisServer) -> None:
    triton = TritonServer(repo, tmp_path / "triton")
    with triton, SidecarProcess(triton.url, tmp_path / "a", "triton", _args(redis_server)) as first:
        # The first call sets the fleet's probe request going; soon the answers go to Redis too.
        wait_until(lambda: infer(first.port, 1.5)[1] == "hit", 10, "an in-process hit")
        wait_until(lambda: infer(first.port, 2.5) == (5.0, "hit") or None, 10, "a second answer cached")
        with SidecarProcess(triton.url, tmp_path / "b", "triton", _args(redis_server)) as second:
            # Same files: the second replica gets the first one's answers from Redis once it knows the model.
            wait_until(lambda: infer(second.port, 2.5)[1] == "hit", 10, "the fleet's answer")
        triton.stop()
        write_model(repo, 3.0)  # new files, same name, version and configuration
        triton.start()
        wait_until(lambda: first.is_ready(), 30, "the first sidecar ready again")
        assert infer(first.port, 2.5)[0] == 7.5
        with SidecarProcess(triton.url, tmp_path / "c", "triton", _args(redis_server)) as third:
            for _ in range(5):
                assert infer(third.port, 2.5)[0] == 7.5


def test_a_model_reloaded_in_place_loses_its_cached_answers(repo: Path, tmp_path: Path,
                                                            redis_server: RedisServer) -> None:
    triton = TritonServer(repo, tmp_path / "triton",
                          extra_args=["--model-control-mode=poll", "--repository-poll-secs=1"])
    with triton, SidecarProcess(triton.url, tmp_path / "a", "triton",
                                _args(redis_server, "--set", "cache.verify_interval=0.5")) as sidecar:
        wait_until(lambda: infer(sidecar.port, 4.0) == (8.0, "hit") or None, 10, "the answer cached")
        (repo / "scaled" / "1" / "factor.txt").write_text("5.0")
        (repo / "scaled" / "1" / "model.py").write_text(MODEL + "\n# reloaded\n")  # poll mode sees the change
        # Triton reloads within its poll period; the sidecar drops the old answers at its next check.
        wait_until(lambda: infer(sidecar.port, 4.0)[0] == 20.0, 20, "the new model's answer through the sidecar")
