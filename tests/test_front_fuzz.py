"""Fuzzing the data port's HTTP/1.1 front with raw bytes (hypothesis).

The sidecar runs in front of a scripted upstream in this process that answers every request it gets, at
once, with a fixed small JSON body (``x-fuzz-upstream: 1``); so every answer without that header, and every
5xx, is of the sidecar's own making. Requests are generated as bytes: random methods and versions, targets
with random bytes (control characters, %-escapes, very long ones), many, duplicate and conflicting headers
(Content-Length, Transfer-Encoding, Expect, Inference-Header-Content-Length, non-ASCII bytes), bodies
framed right or wrong (bad chunk sizes, short and long lengths), JSON-ish and binary bodies for the
inference paths, pipelined requests and truncated ones. Every request carries a marker.

Properties, for every example:
- the sidecar process lives and its admin ``/livez`` answers 200;
- the connection ends (answered, or closed) within a deadline: nothing hangs;
- what comes back is well-formed HTTP/1.1 (httptools' llhttp parser accepts it), message after message;
- no 5xx at all (the upstream never misbehaves); every answer the sidecar makes itself is JSON
  ``{"error": "..."}``;
- neither the answers nor the sidecar's log carry the marker (request bytes) or a traceback, and the log
  has no ERROR line;
- the upstream receives only well-formed requests.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import re
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import HOST, http_status
from tests.sidecar_proc import SidecarProcess

MARK = "zq" + secrets.token_hex(6)  # lower-case hex: survives in tokens, paths and JSON strings
UPSTREAM_BODY = b'{"fuzz":"upstream"}'
READ_DEADLINE = 8.0  # header and body timeouts are 1 s: every connection must be over well before this


# -- the scripted upstream ---------------------------------------------------------------------------


class _UpstreamConnection:
    """One connection: llhttp parses each request; each complete one is answered at once."""

    def __init__(self, sock: socket.socket, upstream: ScriptedUpstream) -> None:
        self.sock = sock
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = bytearray()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.partition(b"?")[0]
        if path in (b"/v2/health/ready", b"/v2/health/live"):
            body, kind = b"", b"text/plain"
        elif path == b"/v2/repository/index" and method == b"POST":
            body, kind = b"[]", b"application/json"
        else:
            body, kind = UPSTREAM_BODY, b"application/json"
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nx-fuzz-upstream: 1\r\nContent-Length: %d\r\n\r\n"
                % (kind, len(body)))
        self.upstream.received.append((self.url, bytes(self.body)))
        self.sock.sendall(head if method == b"HEAD" else head + body)

    def serve(self) -> None:
        while data := self.sock.recv(65536):
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as e:  # the sidecar sent something llhttp refuses
                self.upstream.errors.append(f"malformed request forwarded upstream ({e}): {data[:200]!r}")
                return
            except httptools.HttpParserUpgrade:
                self.upstream.errors.append(f"upgrade forwarded upstream: {data[:200]!r}")
                return


class ScriptedUpstream:
    """A model server that always answers 200 at once: health paths empty, the repository index ``[]``,
    anything else ``{"fuzz":"upstream"}``."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.received: collections.deque[tuple[bytes, bytes]] = collections.deque(maxlen=64)  # (target, body)
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    _UpstreamConnection(self.request, upstream).serve()

        self.server = socketserver.ThreadingTCPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="scripted-upstream", daemon=True)

    def __enter__(self) -> ScriptedUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Front:
    proc: SidecarProcess
    upstream: ScriptedUpstream
    log_offset: int = 0


FRONT_ARGS = ["--set", "limits.header_timeout=1", "--set", "limits.body_timeout=1", "--set", "log_level=debug"]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    workdir = tmp_path_factory.mktemp("fuzz")
    with ScriptedUpstream() as upstream, SidecarProcess(upstream.url, workdir, "triton", FRONT_ARGS) as proc:
        yield Front(proc, upstream)


@pytest.fixture(scope="module")
def front_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """The same front with two data-plane workers (the kernel spreads the fuzz's connections over both)."""
    workdir = tmp_path_factory.mktemp("fuzz-workers")
    args = [*FRONT_ARGS, "--set", "workers=2"]
    with ScriptedUpstream() as upstream, SidecarProcess(upstream.url, workdir, "triton", args) as proc:
        yield Front(proc, upstream)


# -- generated requests -------------------------------------------------------------------------------

TARGETS = [b"/v2/health/ready", b"/v2/health/live", b"/v2/models/m/infer", b"/v2/models/m/versions/1/infer",
           b"/v1/models/m:predict", b"/v1/models/m/versions/2:classify", b"/v1/models/m/labels/x:regress",
           b"/v2/repository/index", b"/v2/models/m", b"/v2/models/m/ready", b"/v1/models/m", b"/", b"*",
           b"http://h/v2/models/m/infer", b"/v2/models/m/generate"]
INFER_TARGETS = [t for t in TARGETS if t.endswith((b"infer", b"predict", b"classify", b"regress"))]
DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64", "BYTES", "FP99", ""]

mark_text = st.sampled_from([MARK, f"{MARK}-é", f"<{MARK}>"])
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8), mark_text)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6) | mark_text, inner, max_size=4), max_leaves=12)


def dumps(value: Any) -> bytes:
    """JSON text; integers beyond 64 bits too (orjson refuses them, the standard library writes them)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode()


@st.composite
def kserve_doc(draw: st.DrawFn) -> Any:
    tensor: dict[str, Any] = {"name": draw(st.sampled_from(["INPUT0", MARK])),
                              "datatype": draw(st.sampled_from(DATATYPES)),
                              "shape": draw(st.lists(st.integers(-2, 2**41), max_size=3))}
    if draw(st.booleans()):
        tensor["data"] = draw(st.lists(json_leaf, max_size=6))
    else:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-4, 64))}
    doc: dict[str, Any] = {"inputs": [tensor], "id": MARK}
    if draw(st.booleans()):
        doc["outputs"] = [{"name": MARK, "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.booleans()):
        doc[MARK] = draw(json_value)
    return doc


@st.composite
def inference_body(draw: st.DrawFn, defect: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A body for an inference path and the headers that describe it."""
    kind = draw(st.sampled_from(["kserve", "tf", "json", "binary", "kserve+binary"]))
    headers: list[tuple[bytes, bytes]] = []
    if kind == "kserve":
        body = dumps(draw(kserve_doc()))
    elif kind == "tf":
        key = draw(st.sampled_from(["instances", "inputs", "examples", MARK]))
        body = dumps({key: draw(json_value), "signature_name": MARK})
    elif kind == "json":
        body = dumps([MARK, draw(json_value)])
    elif kind == "binary":
        body = MARK.encode() + draw(st.binary(max_size=300))
    else:
        head = dumps(draw(kserve_doc()))
        body = head + draw(st.binary(max_size=64)) + MARK.encode()
        headers.append((b"Inference-Header-Content-Length", str(len(head)).encode()))
    if defect == "inference-length":
        value = draw(st.one_of(st.integers(-10, 2**40).map(lambda n: str(n).encode()),
                               st.sampled_from([b"", b"abc", b"+5", b"\xc2\xb2", b"9" * 40, b"1, 2"])))
        headers.append((b"Inference-Header-Content-Length", value))
    if defect == "content-encoding":
        coding = draw(st.sampled_from([b"gzip", b"deflate", b"br", b"x-fuzz"]))
        if coding == b"gzip" and draw(st.booleans()):
            body = gzip.compress(body)
        headers.append((b"Content-Encoding", coding))
    return body, headers


@dataclass
class Request:
    wire: bytes
    method: bytes
    notes: list[str] = field(default_factory=list)  # the defect and the framing, for the reader of a failure


def chunked(body: bytes, draw: st.DrawFn, bad: bool) -> bytes:
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]]
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), draw(st.sampled_from([b"", b";ext=1", b"; x"])), p) for p in pieces)
    if bad:
        return out + draw(st.sampled_from([
            b"zz\r\nab\r\n0\r\n\r\n", b"-1\r\nab\r\n0\r\n\r\n", b"fffffffffffffffffffff\r\nab\r\n", b"2\r\nabcd\r\n",
            b"2\r\nab", b"0\r\nTrailer: \x01\r\n\r\n", b"2 \r\nab\r\n0\r\n\r\n", b"0x2\r\nab\r\n0\r\n\r\n",
            b"\r\n0\r\n\r\n", b"0\n\n"]))
    return out + b"0\r\n" + draw(st.sampled_from([b"", b"X-Trailer: " + MARK.encode() + b"\r\n"])) + b"\r\n"


DEFECTS = ["none"] * 8 + [
    "method", "target-bytes", "target-escape", "target-long", "version", "header-name", "header-value",
    "many-headers", "huge-header", "framing", "framing", "transfer-coding", "expect", "connection", "bare-lf",
    "odd-line", "inference-length", "content-encoding"]
GOOD_METHODS = [b"GET", b"POST", b"POST", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]
ODD_METHODS = [b"TRACE", b"CONNECT", b"PROPFIND", b"PURGE", b"FOO", b"get", b"", b"G ET", b"POST\x00", b"M" * 40]
ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"http/1.1", b"", b"HTTP/1.1 x", b"HTTP/1"]
token = st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,11}\Z")
safe_value = st.from_regex(rb"\A[ -~\x80-\xff]{0,40}\Z").map(lambda v: v.strip())


@st.composite
def request(draw: st.DrawFn, first: bool) -> Request:
    """A request with at most one defect (``Request.notes`` names it); everything else about it is valid."""
    defect = draw(st.sampled_from(DEFECTS))
    method = draw(st.sampled_from(GOOD_METHODS + ([b"HEAD"] if first else [])))
    if defect == "method":
        method = draw(st.sampled_from(ODD_METHODS))
    infer = draw(st.integers(0, 2)) > 0
    target = draw(st.sampled_from(INFER_TARGETS if infer else TARGETS))
    if defect == "target-bytes":
        at = draw(st.integers(0, len(target)))
        target = target[:at] + draw(st.binary(min_size=1, max_size=6)) + target[at:]
    elif defect == "target-escape":
        target += draw(st.sampled_from([b"%2e%2e/", b"%zz", b"%", b"%00", b"%5f", b"/../x", b"//", b"#frag",
                                        b"%C3%A9", b"\xc3\xa9", b"%0d%0a", b"?a=%zz"]))
    elif defect == "target-long":
        target += b"/" + b"a" * draw(st.sampled_from([1000, 9000, 70000]))
    target += (b"&m=" if b"?" in target else b"?m=") + MARK.encode()
    version = draw(st.sampled_from(ODD_VERSIONS)) if defect == "version" else b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"fuzz"), (b"X-Fuzz-Marker", MARK.encode())]
    headers += draw(st.lists(st.tuples(token, safe_value), max_size=3))
    if defect == "header-name":
        headers.append((draw(st.binary(min_size=1, max_size=12).filter(lambda b: not set(b) & set(b"\r\n:"))),
                        b"v"))
    elif defect == "header-value":
        headers.append((b"X-Odd", draw(st.sampled_from([b"a\x00b", b"a\x7fb", b"a\x01", b"\x1b[0m"])
                                       | st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b))))
    elif defect == "many-headers":
        headers += [(b"X-Many-%d" % i, b"v" * 20) for i in range(draw(st.sampled_from([100, 1000, 4000])))]
    elif defect == "huge-header":
        headers.append((b"X-Huge", b"h" * draw(st.sampled_from([60000, 70000]))))
    elif defect == "expect":
        headers.append((b"Expect", draw(st.sampled_from([b"100-continue", b"100-Continue", b"200-ok", b""]))))
    elif defect == "connection":
        headers += draw(st.sampled_from([[(b"Connection", b"close")], [(b"Connection", b"keep-alive")],
                                         [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
                                         [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")],
                                         [(b"Connection", b"TE, X-Fuzz-Marker")], [(b"Connection", b"content-length")],
                                         [(b"Proxy-Connection", b"keep-alive")]]))
    body = b""
    if method in (b"POST", b"PUT", b"PATCH") or draw(st.integers(0, 5)) == 0:
        if infer:
            body, more = draw(inference_body(defect))
            headers += more
        else:
            body = draw(st.sampled_from([b"{}", b"[]", b"", MARK.encode()])) + draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length"] * 2 + ["chunked"]))
    if defect == "framing":
        framing = draw(st.sampled_from(["chunked-bad", "length-short", "length-long", "none", "two-lengths",
                                        "same-two-lengths", "length+chunked", "bad-length"]))
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "length-short":
        headers.append((b"Content-Length", b"%d" % max(0, len(body) - draw(st.integers(1, 8)))))
    elif framing == "length-long":
        headers.append((b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 8)))))
    elif framing == "two-lengths":
        headers += [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % (len(body) + 1))]
    elif framing == "same-two-lengths":
        headers += [(b"Content-Length", b"%d" % len(body))] * 2
    elif framing == "bad-length":
        headers.append((b"Content-Length", draw(st.sampled_from([b"", b"1, 1", b" 5", b"0x10", b"+3", b"-1",
                                                                 b"9" * 30, b"\xc2\xb2"]))))
    elif framing in ("chunked", "chunked-bad", "length+chunked"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        if framing == "length+chunked":
            headers.append((b"Content-Length", b"%d" % len(body)))
        body = chunked(body, draw, framing == "chunked-bad")
    if defect == "transfer-coding":
        headers = [h for h in headers if h[0] != b"Content-Length"]
        headers.append((b"Transfer-Encoding", draw(st.sampled_from([
            b"chunked, chunked", b"gzip, chunked", b"identity", b"chunked ", b"Chunked", b"xchunked", b"chunked;a=b",
            b"", b"gzip", b"chunked, gzip"]))))
    order = draw(st.permutations(range(len(headers)))) if len(headers) < 12 else range(len(headers))
    lines = [b"%s %s %s" % (method, target, version)] + [b"%s: %s" % headers[i] for i in order]
    if defect == "odd-line":
        lines.insert(2, draw(st.sampled_from([b" folded continuation", b"no colon here", b": no name",
                                              b"Name : space before colon", b"\tTab: start"])))
    eol = b"\n" if defect == "bare-lf" else b"\r\n"
    return Request(eol.join(lines) + eol + eol + body, method, [defect, framing])


@dataclass
class Exchange:
    requests: list[Request]
    truncate_at: int | None  # cut the byte stream here and half-close

    def stream(self) -> bytes:
        data = b"".join(r.wire for r in self.requests)
        if self.truncate_at is not None:
            return data[: 1 + self.truncate_at % max(1, len(data) - 1)]
        # A last well-formed request that asks the sidecar to close: the answer stream then ends by itself.
        return data + b"GET /v2/health/live HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n"


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    count = draw(st.integers(1, 3))
    requests = [draw(request(first=i == 0)) for i in range(count)]
    truncate = draw(st.integers(1, 2**16)) if draw(st.integers(0, 9)) == 0 else None
    return Exchange(requests, truncate)


# -- one exchange on the wire, and what came back -----------------------------------------------------


@dataclass
class Message:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False


class _Collector:
    def __init__(self, parser_holder: list[httptools.HttpResponseParser]) -> None:
        self.messages: list[Message] = []
        self._parser = parser_holder

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.messages[-1].status = self._parser[0].get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def parse_answers(data: bytes, head_first: bool) -> tuple[list[Message], str | None]:
    """Every answer in ``data`` (llhttp, strict); the answer to a HEAD first request has no body."""
    messages: list[Message] = []
    if head_first and data:
        while data.startswith(b"HTTP/1.1 100 "):  # interim answers come first
            end = data.find(b"\r\n\r\n")
            data = data[end + 4:] if end >= 0 else b""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return messages, f"an incomplete head: {data[:200]!r}"
        head, data = data[: end + 4], data[end + 4:]
        holder: list[httptools.HttpResponseParser] = []
        collector = _Collector(holder)
        holder.append(httptools.HttpResponseParser(collector))
        try:
            holder[0].feed_data(head)
        except httptools.HttpParserError as e:
            return messages, f"a malformed head ({e}): {head[:200]!r}"
        message = collector.messages[0]
        message.complete = True
        messages.append(message)
        length = int(dict((k.lower(), v) for k, v in message.headers).get(b"content-length", b"0"))
        if data and closes(message) and len(data) == length:
            return messages, None  # the sidecar's refusal of a malformed HEAD, body included, then closed
    holder = []
    collector = _Collector(holder)
    holder.append(httptools.HttpResponseParser(collector))
    try:
        holder[0].feed_data(data)
    except httptools.HttpParserError as e:
        return messages + collector.messages, f"malformed answer ({e}) in {data[:300]!r}"
    return messages + collector.messages, None


def closes(message: Message) -> bool:
    return any(k.lower() == b"connection" and v.lower() == b"close" for k, v in message.headers)


def exchange(port: int, stream: bytes, half_close: bool) -> tuple[bytes, bool, float]:
    """Send ``stream``, read until the sidecar closes; (bytes, reset seen, seconds)."""
    started = time.monotonic()
    sock = socket.create_connection((HOST, port), timeout=READ_DEADLINE)
    data, reset = bytearray(), False
    try:
        try:
            sock.sendall(stream)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            reset = True  # the sidecar refused early and closed while we were still sending
        while time.monotonic() - started < READ_DEADLINE:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return bytes(data), reset, time.monotonic() - started


REQUEST_ID_LINE = re.compile(rb"(?im)^x-request-id:[^\r\n]*\r?$")


@dataclass
class Problems:
    """What one exchange broke, by property (each asserted on its own line, so hypothesis reports each
    property's failures as a bug of its own)."""

    crashed: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    server_error: list[str] = field(default_factory=list)
    own_answer: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    log_error: list[str] = field(default_factory=list)
    log_leak: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return [p for kind in vars(self).values() for p in kind]


def check(front: Front, ex: Exchange) -> Problems:
    problems = Problems()
    head_first = ex.requests[0].method == b"HEAD"
    data, reset, seconds = exchange(front.proc.port, ex.stream(), half_close=ex.truncate_at is not None)
    if seconds >= READ_DEADLINE:
        problems.hung.append(f"the connection was neither closed nor finished within {READ_DEADLINE} s")
    messages, malformed = parse_answers(data, head_first)
    if malformed:
        problems.malformed.append(malformed)
    for i, message in enumerate(messages):
        if not message.complete:
            if not reset:
                problems.malformed.append(f"answer #{i} cut short: {message.status}, {bytes(message.body[:200])!r}")
            continue
        if message.status >= 500:
            problems.server_error.append(f"answer #{i} is a {message.status}: {bytes(message.body[:300])!r}")
        own = not any(k.lower() == b"x-fuzz-upstream" for k, _ in message.headers)
        if own and message.status >= 400 and not (i == 0 and head_first):
            try:
                doc = orjson.loads(bytes(message.body))
            except orjson.JSONDecodeError:
                doc = None
            if not (isinstance(doc, dict) and list(doc) == ["error"] and isinstance(doc["error"], str)):
                problems.own_answer.append(f"answer #{i} ({message.status}) of the sidecar's own is not JSON "
                                           f'{{"error": ...}}: {bytes(message.body[:300])!r}')
            kind = dict((k.lower(), v) for k, v in message.headers).get(b"content-type")
            # Triton labels its own 405 (a method it does not know) text/plain; the sidecar answers as it does.
            if kind != (b"text/plain" if message.status == 405 else b"application/json"):
                problems.own_answer.append(f"answer #{i} ({message.status}) of the sidecar's own has content-type "
                                           f"{kind!r}")
    scrubbed = REQUEST_ID_LINE.sub(b"", data)  # x-request-id is the caller's own, echoed by design
    if MARK.encode() in scrubbed:
        problems.leaked.append(f"request bytes (the marker) came back in an answer: {data[:400]!r}")
    if b"Traceback" in data:
        problems.leaked.append(f"a traceback came back in an answer: {data[:400]!r}")
    if not front.proc.running:
        problems.crashed.append(f"the sidecar exited: {front.proc.returncode}")
    elif http_status(front.proc.admin_port, "/livez", timeout=5.0) != 200:
        problems.crashed.append("admin /livez does not answer 200")
    with front.proc.log_path.open("rb") as log:
        log.seek(front.log_offset)
        new = log.read()
    front.log_offset += len(new)
    for needle, found in ((b"Traceback", problems.log_error), (b" ERROR ", problems.log_error),
                          (MARK.encode(), problems.log_leak)):
        if needle in new:
            at = new.index(needle)
            found.append(f"the sidecar's log has {needle!r}: {new[max(0, at - 200):at + 300]!r}")
    if front.upstream.errors:
        problems.upstream.extend(front.upstream.errors)
        front.upstream.errors.clear()
    return problems


@settings(max_examples=1500, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(ex=exchanges())
def test_front_survives_raw_http_fuzz(front: Front, ex: Exchange) -> None:
    assert_survives(front, ex)


@settings(max_examples=1500, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(ex=exchanges())
def test_front_of_two_workers_survives_raw_http_fuzz(front_workers: Front, ex: Exchange) -> None:
    assert_survives(front_workers, ex)


def assert_survives(front: Front, ex: Exchange) -> None:
    found = check(front, ex)
    sent = f"\nrequest bytes: {ex.stream()[:1500]!r}"
    assert not found.crashed, "\n".join(found.all()) + sent
    assert not found.hung, "\n".join(found.all()) + sent
    assert not found.malformed, "\n".join(found.all()) + sent
    assert not found.server_error, "\n".join(found.all()) + sent
    assert not found.own_answer, "\n".join(found.all()) + sent
    assert not found.leaked, "\n".join(found.all()) + sent
    assert not found.log_error, "\n".join(found.all()) + sent
    assert not found.log_leak, "\n".join(found.all()) + sent
    assert not found.upstream, "\n".join(found.all()) + sent


M = MARK.encode()
H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"  # curl --http2
INFER_BODY = b'{"inputs":[{"name":"INPUT0","shape":[1],"datatype":"FP32","data":[1]}]}'
# Fixed raw requests: each finding of the fuzz as its minimal form, and the framing attacks every HTTP front
# must refuse cleanly. Each goes through the same checks as a generated example.
KNOWN: dict[str, bytes] = {
    "asterisk target with a query": b"GET *?m=" + M + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "asterisk target with a suffix": b"OPTIONS *" + M + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "upgrade header on a pass-through body": b"PATCH /v2/models/m HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                             b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    "h2c upgrade on a chunked pass-through body": b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n" + H2C
                                                  + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "a body field name the codec does not model": b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                                  + str(len(b'{"inputs":[],"' + M + b'":1}')).encode()
                                                  + b"\r\n\r\n" + b'{"inputs":[],"' + M + b'":1}',
    "content-length and chunked": b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two content-lengths": b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                           b"Content-Length: 3\r\n\r\n{}",
    "bad chunk size": b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\n" + M + b"\r\n0\r\n\r\n",
    "chunk size overflow": b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"fffffffffffffffffffff\r\n" + M + b"\r\n",
    "transfer-coding not ending in chunked": b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
                                             b"Transfer-Encoding: chunked, gzip\r\n\r\n" + M,
    "obsolete line folding": b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-A: a\r\n " + M + b"\r\n\r\n",
    "bare LF line ends": b"GET /v2/health/ready?" + M + b" HTTP/1.1\nHost: x\n\n",
    "NUL in the target": b"GET /v2/health/ready\x00" + M + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "fragment in the target": b"GET /v2/health/ready#" + M + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header section over the limit": b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + M * 6000 + b"\r\n\r\n",
    "CONNECT": b"CONNECT " + M + b":443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/2.0 request line": b"GET /v2/health/ready HTTP/2.0\r\nHost: x\r\n\r\n",
    "HTTP/1.0 keep-alive": b"GET /v2/health/ready HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "expect 100-continue": b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                           b"Content-Length: " + str(len(INFER_BODY)).encode() + b"\r\n\r\n" + INFER_BODY,
    "non-ASCII header name": b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-\xc3\xa9: " + M + b"\r\n\r\n",
    "control character in a header value": b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-A: a\x01" + M
                                           + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_raw_requests(front: Front, name: str) -> None:
    found = check(front, Exchange([Request(KNOWN[name], KNOWN[name].partition(b" ")[0])], None))
    assert not found.all(), "\n".join(found.all()) + f"\nrequest bytes: {KNOWN[name][:500]!r}"


WEBSOCKET = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"


@pytest.mark.parametrize(("upgrade", "target", "framing"), [
    (H2C, b"/v2/models/m/infer", "length"),
    (WEBSOCKET, b"/v1/models/m:predict", "chunked"),
    (H2C, b"/v2/repository/index", "length"),
    (WEBSOCKET, b"/v2/repository/index", "chunked"),
], ids=["h2c-infer-length", "websocket-predict-chunked", "h2c-passthrough-length", "websocket-passthrough-chunked"])
def test_an_upgrade_header_never_costs_the_body(front: Front, upgrade: bytes, target: bytes, framing: str) -> None:
    """HTTP/1.1 servers may ignore Upgrade (RFC 9110 7.8), and Triton does: the request, body and all, is
    answered as if the header were not there. curl --http2 on an http:// URL sends exactly this."""
    body = b'{"inputs":[],"id":"' + M + b'"}'
    framed = (b"Content-Length: %d\r\n\r\n%s" % (len(body), body) if framing == "length"
              else b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    stream = b"POST " + target + b"?u=" + M + b" HTTP/1.1\r\nHost: x\r\n" + upgrade + framed
    data, _, _ = exchange(front.proc.port, stream, half_close=False)
    messages, malformed = parse_answers(data, head_first=False)
    assert malformed is None and messages, data
    expected = b"[]" if target == b"/v2/repository/index" else UPSTREAM_BODY  # what the scripted upstream says
    assert messages[0].status == 200 and bytes(messages[0].body) == expected, data[:300]
    upstream = [got for url, got in front.upstream.received if url.endswith(b"?u=" + M)]
    assert upstream and upstream[-1] == body, f"the model server received {upstream[-1:]!r}"


@pytest.mark.parametrize("follower", [
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + WEBSOCKET + b"Content-Length: 0\r\n\r\n",
    b"\x00\x01 not HTTP at all\r\n\r\n",
], ids=["another-upgrade", "garbage"])
def test_what_follows_an_upgrade_requests_body_is_ignored(front: Front, follower: bytes) -> None:
    """The connection closes after an upgrade request's answer; bytes after its body (another upgrade
    request, once a crash in the body's own parser) are never parsed as anything."""
    stream = (b"POST /v2/repository/index?f=" + M + b" HTTP/1.1\r\nHost: x\r\n" + WEBSOCKET
              + b"Content-Length: 2\r\n\r\n{}" + follower)
    data, _, seconds = exchange(front.proc.port, stream, half_close=False)
    messages, malformed = parse_answers(data, head_first=False)
    assert malformed is None and len(messages) == 1 and messages[0].status == 200, data[:300]
    assert seconds < READ_DEADLINE  # closed, not left hanging
    assert b"Traceback" not in front.proc.log_path.read_bytes()


def test_fuzz_upstream_answers_and_the_sidecar_is_ready(front: Front) -> None:
    """The harness itself: the sidecar is ready in front of the scripted upstream, and an ordinary call gets
    the upstream's answer through it."""
    assert http_status(front.proc.admin_port, "/readyz") == 200
    body = orjson.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": [1]}]})
    stream = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    data, _, _ = exchange(front.proc.port, stream, half_close=False)
    messages, malformed = parse_answers(data, head_first=False)
    assert malformed is None and len(messages) == 1, data
    assert messages[0].status == 200 and bytes(messages[0].body) == UPSTREAM_BODY

