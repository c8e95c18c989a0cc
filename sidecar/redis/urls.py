"""Redis URLs as the configuration names them, and as logs may show them.

    redis://[user:password@]host:port[/db]            one server (rediss:// with TLS; unix:///path.sock)
    redis+cluster://[user:password@]host:port[,host:port...]          Redis Cluster (any nodes: the rest
                                                                      are discovered)
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]   the master Sentinel names
                                                                      ``service``, followed across failovers

``rediss+cluster://`` and ``rediss+sentinel://`` speak TLS. Credentials go in the user-info or the query
(``?password=...``, ``&username=...``), as for a single server; ``sentinel_password`` in the query is the
Sentinels' own when it differs from the data nodes'.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ..config import REDIS_SCHEMES

SCHEMES = REDIS_SCHEMES
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}


def is_redis(location: str) -> bool:
    return location.lower().startswith(SCHEMES)


@dataclass(frozen=True)
class Target:
    """What a ``redis+cluster://`` or ``redis+sentinel://`` URL names (a single server's URL is kept whole)."""

    kind: str  # "server" | "cluster" | "sentinel"
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""  # sentinel: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


def parse(url: str) -> Target:
    """ValueError naming what is wrong (never the password)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or f"{scheme}://" not in SCHEMES:
        raise ValueError(f"not a Redis URL (schemes: {', '.join(SCHEMES)})")
    if "+" not in scheme:
        return Target("server", tls=scheme == "rediss")
    kind = scheme.partition("+")[2]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    nodes = tuple(_node(h, _DEFAULT_PORT[kind]) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError(f"{scheme}:// names no host:port")
    parts = [p for p in path.split("/") if p]
    service, db = "", 0
    if kind == "sentinel":
        if not parts:
            raise ValueError("redis+sentinel:// needs the service (master) name as its path: .../mymaster")
        service, parts = unquote(parts[0]), parts[1:]
    if parts:
        if kind == "cluster" or len(parts) > 1 or not parts[0].isdigit():
            raise ValueError(f"unexpected path {path!r}" + (" (a cluster has only db 0)" if kind == "cluster" else ""))
        db = int(parts[0])
    return Target(kind, nodes, service, db, unquote(username) or params.get("username") or None,
                  unquote(password) or params.get("password") or None, params.get("sentinel_password"),
                  scheme.startswith("rediss"))


def _node(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad host:port {text!r}")
    return host, int(port) if port else default_port


def redact(url: str) -> str:
    """``url`` without user, password or query (which may carry ``password=``)."""
    scheme, sep, rest = url.partition("://")
    if sep and "+" in scheme:
        netloc, _, path = rest.partition("?")[0].partition("/")
        return f"{scheme}://{netloc.rpartition('@')[2]}{'/' + path if path else ''}"
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() == "unix":
            return f"unix://{parts.path}"
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def hash_tag(namespace: str) -> str:
    """``{namespace}``: keys that one script or transaction touches share it, so Redis Cluster keeps them in one
    slot (single servers and Sentinel ignore the braces)."""
    return "{" + namespace + "}"
