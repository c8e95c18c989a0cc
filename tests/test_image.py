"""The container image, as far as it can be checked without a container engine: what the
Dockerfile declares, that its ENTRYPOINT/CMD are a valid command line for the real parser, and
that the wheel it installs works from a clean virtual environment."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
import yaml

from sidecar.cli import _parser, main
from sidecar.config import load

ROOT = Path(__file__).resolve().parents[1]
PORTS = {9000, 9001, 9090, 9091}  # HTTP data, gRPC data, admin, agent


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(ROOT / "Dockerfile")
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def exec_form(stage: list[tuple[str, str]], word: str) -> list[str]:
    (args,) = [rest for w, rest in stage if w == word]
    value = json.loads(args)  # exec form: no shell between the kubelet's signals and the sidecar
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_image_runs_as_non_root_and_exposes_the_sidecar_ports() -> None:
    stage = final_stage()
    (user,) = [rest for w, rest in stage if w == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    exposed = {int(p) for w, rest in stage if w == "EXPOSE" for p in rest.split()}
    assert exposed == PORTS
    assert not [w for w, _ in instructions(ROOT / "Dockerfile") if w == "HEALTHCHECK"]


def test_entrypoint_is_the_installed_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form(final_stage(), "ENTRYPOINT") == ["sidecar"] and "sidecar" in scripts
    for word, rest in instructions(ROOT / "Dockerfile"):
        if word == "COPY" and "--from" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), source


def test_default_command_parses_and_its_configuration_loads(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for name in [n for n in os.environ if n.startswith("SIDECAR_")]:
        monkeypatch.delenv(name)
    stage = final_stage()
    argv = exec_form(stage, "ENTRYPOINT")[1:] + exec_form(stage, "CMD")
    ns = _parser().parse_args(argv)
    assert ns.command == "run"
    # The same arguments, with `config` for `run`: what the container would start with.
    assert main(["config", *argv[1:]]) == 0
    shown = capsys.readouterr().out
    assert "0.0.0.0:9000" in shown and "0.0.0.0:9090" in shown
    cfg = load(None, {}, None)
    assert (cfg.listen, cfg.admin) == ("0.0.0.0:9000", "0.0.0.0:9090")


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=env, check=False,
                          **kwargs)  # type: ignore[call-overload]


# Slow (a wheel build and a pip install, about 30 s with a warm pip cache): the timeout says so.
@pytest.mark.timeout(300)
def test_wheel_installs_into_a_clean_venv_and_its_commands_work(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)])
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("warm_sidecar-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    # With the pins the Dockerfile builds with (constraints.txt): the image's set of versions.
    installed = _run([str(bin_dir / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)],
                     cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    sidecar = str(bin_dir / "sidecar")
    for args in (["--help"], ["run", "--help"], ["inject", "--help"], ["webhook", "--help"]):
        result = _run([sidecar, *args], cwd=tmp_path)  # cwd: the source tree is not importable
        assert result.returncode == 0 and "usage: sidecar" in result.stdout, (args, result.stderr[-2000:])
    assert _run([sidecar, "config"], cwd=tmp_path).returncode == 0
    result = _run([sidecar, "inject", "--mode", "classic"], cwd=tmp_path, input=_base_without_sidecar())
    assert result.returncode == 0, result.stderr[-2000:]
    (doc,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [c["name"] for c in doc["spec"]["template"]["spec"]["containers"]] == ["triton", "warm-sidecar"]


def _base_without_sidecar() -> str:
    """The shipped Triton Deployment minus its sidecar and injection marker."""
    doc = yaml.safe_load((ROOT / "k8s" / "base" / "triton" / "deployment.yaml").read_text())
    del doc["spec"]["template"]["spec"]["initContainers"]
    del doc["spec"]["template"]["metadata"]["annotations"]["warm-sidecar.io/status"]
    return str(yaml.safe_dump(doc, sort_keys=False))
