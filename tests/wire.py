"""Raw HTTP/1.1 exchanges for byte-for-byte comparisons (standard library only)."""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from urllib.parse import urlsplit

# Headers that legitimately differ between two servers answering the same request.
VOLATILE = frozenset({"date", "server", "x-request-id", "connection", "keep-alive", "transfer-encoding"})


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def stable_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers if k.lower() not in VOLATILE and not k.lower().startswith(
            "x-sidecar-")}


def exchange(
    base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Answer:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()
