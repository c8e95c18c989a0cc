"""The ``inject`` and ``webhook`` subcommands (they need no sidecar configuration)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import yaml

from ..config import split_host_port
from .settings import DEFAULT_IMAGE, NATIVE_SINCE, InjectError, Options

_NATIVE = ".".join(map(str, NATIVE_SINCE))

COMMANDS = ("inject", "webhook")
EXIT_USAGE = 2


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.lstrip("v").partition(".")
    if not (major.isdigit() and minor.split(".")[0].isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MAJOR.MINOR, e.g. 1.30")
    return int(major), int(minor.split(".")[0])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"sidecar image (default {DEFAULT_IMAGE})")
    p.add_argument("--mode", choices=("auto", "native", "classic"), default="auto",
                   help="native: init container with restartPolicy Always; classic: a second container; "
                        f"auto (default): native when --kubernetes-version >= {_NATIVE}")
    p.add_argument("--kubernetes-version", type=_version, default=NATIVE_SINCE, metavar="MAJOR.MINOR",
                   help=f"the cluster's version: picks the sidecar mode and the preStop form (default {_NATIVE})")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inject = sub.add_parser("inject", help="add the sidecar to Deployment/StatefulSet/Pod YAML "
                                           "(like istioctl kube-inject)")
    inject.add_argument("-f", "--filename", default="-", metavar="FILE", help="YAML or JSON manifests; - is stdin")
    inject.add_argument("-o", "--output", default="-", metavar="FILE", help="where to write them; - is stdout")
    _common(inject)

    hook = sub.add_parser("webhook", help="serve the injector as a mutating admission webhook (HTTPS)")
    hook.add_argument("--cert", required=True, metavar="FILE", help="serving certificate (PEM), reloaded on change")
    hook.add_argument("--key", required=True, metavar="FILE", help="its private key (PEM)")
    hook.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT", help="default 0.0.0.0:8443")
    hook.add_argument("--fail-closed", action="store_true",
                      help="refuse pods that cannot be injected (default: admit them unchanged with a warning)")
    hook.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    _common(hook)


def _options(ns: argparse.Namespace, require_opt_in: bool) -> Options:
    return Options(image=ns.image, mode=ns.mode, kubernetes_version=ns.kubernetes_version,
                   require_opt_in=require_opt_in)


def run(ns: argparse.Namespace) -> int:
    if ns.command == "inject":
        return _inject(ns)
    return _webhook(ns)


def _inject(ns: argparse.Namespace) -> int:
    from .manifests import inject_text

    try:
        text = sys.stdin.read() if ns.filename == "-" else Path(ns.filename).read_text()
        out, report = inject_text(text, _options(ns, require_opt_in=False))
    except OSError as e:
        print(f"sidecar inject: cannot read {ns.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except (yaml.YAMLError, ValueError) as e:  # ValueError: bad JSON
        print(f"sidecar inject: {ns.filename}: not valid YAML or JSON: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InjectError as e:
        print(f"sidecar inject: {e}", file=sys.stderr)
        return EXIT_USAGE
    for note in report.notes:
        print(f"sidecar inject: {note}", file=sys.stderr)
    if ns.output == "-":
        sys.stdout.write(out)
    else:
        Path(ns.output).write_text(out)
    return 0


def _webhook(ns: argparse.Namespace) -> int:
    from .webhook import CertReloader, WebhookSettings, serve

    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = split_host_port(ns.listen)
        tls = CertReloader(ns.cert, ns.key)
    except ValueError:
        print(f"sidecar webhook: --listen {ns.listen!r}: expected HOST:PORT", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # ssl.SSLError is an OSError too: missing, unreadable or mismatched files
        print(f"sidecar webhook: cannot use --cert/--key: {e}", file=sys.stderr)
        return EXIT_USAGE
    settings = WebhookSettings(_options(ns, require_opt_in=True), ns.fail_closed)
    try:
        asyncio.run(serve(host, port, tls, settings))
    except OSError as e:
        print(f"sidecar webhook: cannot listen on {ns.listen}: {e}", file=sys.stderr)
        return 1
    return 0
