"""The settings reference (``docs/configuration.md``), written from the configuration schema itself:
``sidecar config --reference`` prints it, and a test fails when the file differs."""

from __future__ import annotations

from typing import Any

from .config import KeyInfo, keys

_INTRO = """\
# Configuration

Every setting of the sidecar, generated from its configuration schema (`sidecar config --reference >
docs/configuration.md`; a test fails when this file and the schema differ).

One typed tree. Sources, later wins: a YAML file (`--config FILE`, nested keys), the environment
(`SIDECAR_...`: the key upper-cased, dots as underscores), flags (`--upstream`, `--protocol`, `--listen`,
`--admin`, and `--set KEY=VALUE` for any key). A bad value stops start-up with exit status 2 and one
line naming the key, the value and what is allowed. Sizes accept `KiB`/`MiB`/`GiB` suffixes; lists are
comma-separated. `sidecar config` prints the effective configuration as YAML that `--config` reads back
(secrets masked).

Example file:

```yaml
listen: 0.0.0.0:9000
upstream:
  url: http://127.0.0.1:8000
  protocol: triton
  timeout: 30
limits:
  max_body_bytes: 128MiB
cache:
  models: [my_model]
```
"""

_SECTIONS = {
    "": "General",
    "upstream": "The model server (`upstream.*`)",
    "limits": "Limits (`limits.*`)",
    "record": "Recording traffic (`record.*`)",
    "warmup": "Warm-up (`warmup.*`)",
    "gate": "While not warm (`gate.*`)",
    "mesh": "Load balancers (`mesh.*`)",
    "models": "Loading models (`models.*`)",
    "cache": "Response cache (`cache.*`)",
    "batch": "Batching (`batch.*`)",
    "forecast": "Forecast (`forecast.*`)",
}


def _default(info: KeyInfo) -> str:
    value: Any = info.default
    if value in ("", (), None):
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, int) and info.path.endswith("_bytes") and value >= 1024:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size}{unit}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def configuration_markdown() -> str:
    lines = [_INTRO]
    section = None
    for info in keys():
        head = info.path.split(".")[0] if "." in info.path else ""
        if head != section:
            section = head
            lines += ["", f"## {_SECTIONS.get(head, f'`{head}.*`')}", "",
                      "| key | environment | default | meaning |", "|---|---|---|---|"]
        lines.append(f"| `{info.path}` | `{info.env}` | `{_cell(_default(info))}` | {_cell(info.help)} |")
    return "\n".join(lines) + "\n"
