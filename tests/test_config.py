"""Configuration: precedence, validation messages, exit status 2, README coverage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.config import keys, load, read_yaml
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    cfg = load({}, {}, {})
    assert cfg.upstream.url == "http://127.0.0.1:8000"
    assert cfg.upstream.protocol == "auto"
    assert cfg.limits.max_body_bytes == 64 * 1024 * 1024
    assert cfg.listen == "0.0.0.0:9000"


def test_flags_beat_env_beat_file() -> None:
    file_values = {"upstream.timeout": 10, "listen": "127.0.0.1:1", "admin": "127.0.0.1:2"}
    env = {"SIDECAR_UPSTREAM_TIMEOUT": "20", "SIDECAR_LISTEN": "127.0.0.1:3"}
    cfg = load(file_values, env, {"listen": "127.0.0.1:4"})
    assert cfg.upstream.timeout == 20.0
    assert cfg.listen == "127.0.0.1:4"
    assert cfg.admin == "127.0.0.1:2"


def test_sizes_and_lists() -> None:
    cfg = load({}, {"SIDECAR_LIMITS_MAX_BODY_BYTES": "2MiB", "SIDECAR_UPSTREAM_MODELS": "a, b"}, {})
    assert cfg.limits.max_body_bytes == 2 * 1024 * 1024
    assert cfg.upstream.models == ("a", "b")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"upstream.protocol": "grpc"}, "upstream.protocol"),
        ({"upstream.url": "ftp://x"}, "upstream.url"),
        ({"listen": "nohost"}, "listen"),
        ({"upstream.timeout": "-1"}, "upstream.timeout"),
        ({"upstream.pool_size": "many"}, "upstream.pool_size"),
    ],
)
def test_bad_values_name_the_key(flags: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({}, {}, flags)
    assert needle in info.value.message
    assert "allowed" in info.value.message


def test_unknown_file_key() -> None:
    with pytest.raises(ConfigError, match=r"upstream\.tmeout"):
        load({"upstream.tmeout": 3}, {}, {})


def test_cli_bad_value_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--protocol", "grpc"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "upstream.protocol" in lines[0] and "'grpc'" in lines[0] and "triton" in lines[0]


def test_cli_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  url: http://127.0.0.1:8501\n  protocol: tfserving\nlimits:\n  max_body_bytes: 1MiB\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "config", "--config", str(path), "--listen", "127.0.0.1:7"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["upstream"]["protocol"] == "tfserving"
    assert shown["limits"]["max_body_bytes"] == 1048576
    assert shown["listen"] == "127.0.0.1:7"
    # What `sidecar config` prints, `--config` reads back to the same configuration.
    again = tmp_path / "again.yaml"
    again.write_text(proc.stdout)
    assert load(read_yaml(str(again)), {}, {}) == load(read_yaml(str(path)), {}, {"listen": "127.0.0.1:7"})


def test_cli_config_masks_credentials_and_survives_a_closed_pipe() -> None:
    env = {**os.environ, "SIDECAR_STORE": "redis://user:hunter2@redis:6379/0",
           "SIDECAR_RESTRICTED_API": "model-repository:admin-key=s3cret"}
    proc = subprocess.run([sys.executable, "-m", "sidecar", "config"], capture_output=True, text=True, timeout=30,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "s3cret" not in proc.stdout
    assert "redis://***@redis:6379/0" in proc.stdout
    shell = subprocess.run(f"{sys.executable} -m sidecar config | head -1", shell=True, capture_output=True,
                           text=True, timeout=30, env=env)
    assert shell.stdout.strip() and "Traceback" not in shell.stderr and "Broken pipe" not in shell.stderr


def test_cli_bad_secret_is_not_echoed() -> None:
    env = {**os.environ, "SIDECAR_RESTRICTED_API": "nonsense:admin-key=s3cret"}
    proc = subprocess.run([sys.executable, "-m", "sidecar", "run"], capture_output=True, text=True, timeout=30,
                          env=env)
    assert proc.returncode == 2 and "s3cret" not in proc.stderr and "restricted_api" in proc.stderr


def test_the_settings_reference_is_the_schema() -> None:
    """docs/configuration.md is generated from the schema: a setting added, removed or reworded without
    ``sidecar config --reference > docs/configuration.md`` fails here."""
    from sidecar.reference import configuration_markdown

    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k.path for k in keys() if f"`{k.path}`" not in reference or k.env not in reference]
    assert not missing, f"docs/configuration.md lacks these settings: {missing}"
    assert reference == configuration_markdown(), "docs/configuration.md is stale: regenerate it"
    printed = subprocess.run([sys.executable, "-m", "sidecar", "config", "--reference"], capture_output=True,
                             text=True, timeout=30, check=True)
    assert printed.stdout == reference


def test_the_readme_starts_fast() -> None:
    """What it is, the headline, the two commands, running it, Kubernetes in three steps, links: no reference."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000
    for must in ("## The headline", "make test", "make demo", "sidecar run", "## Kubernetes in three steps",
                 "docs/configuration.md", "docs/metrics.md", "docs/guide.md"):
        assert must in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).exists(), link


def test_record_false_takes_the_recorder_out_of_the_pipeline(tmp_path: Path) -> None:
    from sidecar.app import Sidecar

    store = str(tmp_path / "t.db")
    one = {"store": store, "workers": "1"}
    assert [s.name for s in Sidecar(load(one, {}, {})).data.stages] == ["gate", "recorder"]
    config = tmp_path / "c.yaml"
    config.write_text(f"store: {store}\nrecord: false\nworkers: 1\n")
    cfg = load(read_yaml(str(config)), {}, {})
    assert cfg.record.enabled is False
    assert [s.name for s in Sidecar(cfg).data.stages] == ["gate"]


def test_every_metric_is_documented(tmp_path: Path) -> None:
    from sidecar.app import Sidecar

    one = load({"store": str(tmp_path / "t.db"), "workers": "1"}, {}, {})
    lines = Sidecar(one).metrics.render().decode().splitlines()
    # prometheus_client adds a *_created series to each unlabelled counter: its own, not ours to document.
    exported = {line.split()[2] for line in lines if line.startswith("# TYPE") and not line.split()[2].endswith(
        "_created")}
    documented = (ROOT / "docs" / "metrics.md").read_text()
    missing = sorted(name for name in exported if f"`{name}`" not in documented)
    assert exported and not missing, f"docs/metrics.md lacks these metrics: {missing}"


def test_every_admin_path_is_documented() -> None:
    from sidecar.control.admin import AdminFront

    routes = AdminFront.app_routes()
    guide = (ROOT / "docs" / "guide.md").read_text()
    missing = [f"{method} {path}" for method, path in routes if f"`{method} {path}" not in guide]
    assert routes and not missing, f"docs/guide.md lacks these admin paths: {missing}"
