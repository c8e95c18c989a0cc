"""Which container of a pod is the model server, which one, and on which ports it listens."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .settings import InjectError, PodSettings

TRITON, TFSERVING = "triton", "tfserving"
DEFAULT_PORTS = {TRITON: (8000, 8001), TFSERVING: (8501, 8500)}  # (HTTP, gRPC)
# Flags that move the ports, as the servers spell them (`--flag=N` or `--flag N`).
_PORT_FLAGS = {TRITON: ("http-port", "grpc-port"), TFSERVING: ("rest_api_port", "port")}
_TFSERVING_IMAGE_MODEL = "model"  # the tensorflow/serving image's MODEL_NAME default
Obj = dict[str, Any]  # a Kubernetes object or part of one, as parsed from YAML/JSON


@dataclass(frozen=True)
class ModelServer:
    index: int  # in spec.containers
    protocol: str
    http_port: int
    grpc_port: int
    models: tuple[str, ...] = ()  # TF Serving: the models readiness waits for
    # Triton's --http-header-forward-pattern / --grpc-header-forward-pattern: the headers its models see
    # become part of each call's identity in the sidecar.
    http_forward: str = ""
    grpc_forward: str = ""


def _words(container: Obj) -> list[str]:
    """command + args as words; a `sh -c "..."` string is split too, so flags inside it count."""
    words: list[str] = []
    for item in [*container.get("command", []), *container.get("args", [])]:
        try:
            words.extend(shlex.split(str(item)))
        except ValueError:  # unbalanced quotes in a shell string: fall back to whitespace
            words.extend(str(item).split())
    return words


def _flag(words: Sequence[str], name: str) -> str | None:
    pattern = re.compile(rf"^--?{re.escape(name)}(?:=(.*))?$")
    for i, word in enumerate(words):
        m = pattern.match(word)
        if m:
            if m.group(1) is not None:
                return m.group(1)
            return words[i + 1] if i + 1 < len(words) else None
    return None


def _declared_ports(container: Obj) -> set[int]:
    return {int(p["containerPort"]) for p in container.get("ports", []) if "containerPort" in p}


def guess_protocol(container: Obj) -> str | None:
    image = str(container.get("image", ""))
    words = " ".join(_words(container))
    if "tritonserver" in image or "tritonserver" in words:
        return TRITON
    if "tensorflow/serving" in image or "tensorflow_model_server" in words:
        return TFSERVING
    ports = _declared_ports(container)
    if {8000, 8001} <= ports:
        return TRITON
    if ports & {8500, 8501}:
        return TFSERVING
    return None


def _port_from_args(words: Sequence[str], flag: str, default: int) -> int:
    value = _flag(words, flag)
    if value is not None and value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    return default


def _tfserving_models(container: Obj, words: Sequence[str]) -> tuple[str, ...]:
    name = _flag(words, "model_name")
    if name:
        return (name,)
    if _flag(words, "model_config_file") is not None:
        return ()  # many models, named in a file we cannot read: any answer counts as ready
    if "tensorflow/serving" in str(container.get("image", "")):
        env = {e.get("name"): e.get("value") for e in container.get("env", [])}
        return (str(env.get("MODEL_NAME") or _TFSERVING_IMAGE_MODEL),)
    return ()


def find_model_server(containers: Sequence[Obj], s: PodSettings) -> ModelServer | None:
    """The model server container, or None when there is none to put a sidecar in front of."""
    candidates = list(enumerate(containers))
    if s.container is not None:
        candidates = [(i, c) for i, c in candidates if c.get("name") == s.container]
        if not candidates:
            raise InjectError(f"annotation warm-sidecar.io/container: no container named {s.container!r}")
    for index, container in candidates:
        protocol = s.protocol or guess_protocol(container)
        if protocol is None:
            continue
        words = _words(container)
        http_flag, grpc_flag = _PORT_FLAGS[protocol]
        http_default, grpc_default = DEFAULT_PORTS[protocol]
        http_port = s.http_port or _port_from_args(words, http_flag, http_default)
        grpc_port = s.grpc_port or _port_from_args(words, grpc_flag, grpc_default)
        models = _tfserving_models(container, words) if protocol == TFSERVING else ()
        forwards = [_flag(words, f"{kind}-header-forward-pattern") or "" for kind in ("http", "grpc")]
        return ModelServer(index, protocol, http_port, grpc_port, models, *forwards)
    if s.container is not None:
        raise InjectError(f"container {s.container!r}: not Triton or TF Serving; set warm-sidecar.io/protocol")
    return None
