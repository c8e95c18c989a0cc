"""Command line: ``sidecar run`` and friends."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__, logs
from .config import Config, keys, load, read_yaml, render_yaml
from .deploy.cli import COMMANDS as DEPLOY_COMMANDS
from .deploy.cli import add_parsers as add_deploy_parsers
from .errors import ConfigError
from .forecast.commands import add_parser as add_history_parser

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="Keeps Triton / TF Serving pods warm.")
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="proxy the model server and keep it warm")
    _config_flags(run)

    show = sub.add_parser("config", help="print the effective configuration and exit")
    show.add_argument("--reference", action="store_true",
                      help="print the settings reference (docs/configuration.md) instead")
    _config_flags(show)

    plan = sub.add_parser("plan", help="print the warm-up plan the sidecar would run now, without running it")
    _config_flags(plan)

    export = sub.add_parser("export-warmup", help="write the recorded top-N as the model server's own warm-up")
    _config_flags(export)
    export.add_argument("--format", required=True, choices=("tfserving", "triton"))
    export.add_argument("--model", required=True, help="model whose recorded requests to export")
    export.add_argument("--out", required=True, metavar="PATH",
                        help="tfserving: the tf_serving_warmup_requests file; triton: a directory")
    export.add_argument("--max-batch-size", type=int, default=None,
                        help="triton: the model's max_batch_size (default: asked from the upstream)")
    add_history_parser(sub, _config_flags)
    add_deploy_parsers(sub)
    return p


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file")
    p.add_argument("--upstream", metavar="URL", help="model server HTTP URL (upstream.url)")
    p.add_argument("--protocol", metavar="auto|triton|tfserving", help="upstream.protocol")
    p.add_argument("--listen", metavar="HOST:PORT", help="HTTP data port")
    p.add_argument("--admin", metavar="HOST:PORT", help="admin port")
    p.add_argument("--store", metavar="PATH|URL", help="traffic memory: SQLite file path or redis:// URL")
    p.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[],
        help="any configuration key, e.g. --set upstream.timeout=5 (repeatable)",
    )


def _flag_values(ns: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {
        "upstream.url": ns.upstream,
        "upstream.protocol": ns.protocol,
        "listen": ns.listen,
        "admin": ns.admin,
        "store": ns.store,
    }
    known = {k.path for k in keys()}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of: {', '.join(sorted(known))}")
        values[key] = value
    return values


def load_config(ns: argparse.Namespace) -> Config:
    file_values = read_yaml(ns.config) if ns.config else None
    return load(file_values, os.environ, _flag_values(ns))


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.command in DEPLOY_COMMANDS:  # Kubernetes tooling: no sidecar configuration to load
        from .deploy.cli import run as run_deploy

        return run_deploy(ns)
    try:
        cfg = load_config(ns)
    except ConfigError as e:
        print(f"sidecar: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(cfg.log_level, cfg.log_format)
    if ns.command == "config":
        if ns.reference:
            from .reference import configuration_markdown

            return _print(configuration_markdown())
        return _print(render_yaml(cfg))
    if ns.command == "plan":
        from .tools import print_plan

        return asyncio.run(print_plan(cfg))
    if ns.command == "history":
        from .forecast.commands import run as run_history

        return run_history(ns, cfg.forecast, cfg.store)
    if ns.command == "export-warmup":
        from .tools import export_warmup

        return asyncio.run(export_warmup(cfg, ns.format, ns.model, ns.out, ns.max_batch_size))
    return _run(cfg)


def _print(text: str) -> int:
    """Print, surviving a reader that went away (``sidecar config | head``)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(cfg: Config) -> int:
    from .app import serve

    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is a dependency; this only guards odd platforms
        runner = asyncio.run
    try:
        return runner(serve(cfg))
    except ConfigError as e:  # an unusable store path, a port taken: one line, exit 2
        print(f"sidecar: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"sidecar: cannot start: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
