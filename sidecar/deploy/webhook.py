"""``sidecar webhook``: the injector as a mutating admission webhook (HTTPS, aiohttp).

POST /inject  AdmissionReview v1 -> AdmissionReview v1 with a JSON Patch (see review.py)
GET  /healthz 200 while the process serves (the webhook Deployment's probes)

The serving certificate is read again when its files change (cert-manager renews it in the
Secret, the kubelet swaps the mounted files): each TLS handshake checks the files' mtimes, so
a renewed certificate is served without a restart and without a polling task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from dataclasses import dataclass

from aiohttp import web

from .review import answer, malformed
from .settings import Options

log = logging.getLogger("sidecar.webhook")
# The API server sends at most its own request limit (3 MiB by default) of pod JSON; a body
# bigger than this is not an AdmissionReview the API server sent.
MAX_BODY = 8 * 1024 * 1024


class CertReloader:
    """An SSLContext that follows its certificate and key files."""

    def __init__(self, cert: str, key: str) -> None:
        self._cert, self._key = cert, key
        self._stamp = self._files_stamp()
        self.context = self._load()

    def _files_stamp(self) -> tuple[int, int]:
        return os.stat(self._cert).st_mtime_ns, os.stat(self._key).st_mtime_ns

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._cert, self._key)
        ctx.sni_callback = self._on_client_hello
        return ctx

    def _on_client_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            stamp = self._files_stamp()
            if stamp != self._stamp:
                self.context = self._load()
                self._stamp = stamp
                log.info("serving certificate reloaded")
        except (OSError, ssl.SSLError) as e:  # half-written files: keep the old pair, retry next time
            log.warning("serving certificate not reloaded: %s", e)
        if self.context is not ctx:
            conn.context = self.context


@dataclass(frozen=True)
class WebhookSettings:
    opts: Options
    fail_closed: bool = False


SETTINGS = web.AppKey("settings", WebhookSettings)


async def _inject(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        status, review = malformed("", 413, f"request body over {MAX_BODY} bytes", settings.fail_closed)
    else:
        status, review = answer(body, settings.opts, settings.fail_closed)
    return web.json_response(review, status=status)


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_app(settings: WebhookSettings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app.router.add_post("/inject", _inject)
    app.router.add_get("/healthz", _healthz)
    return app


async def serve(host: str, port: int, tls: CertReloader, settings: WebhookSettings) -> None:
    """Serve until SIGTERM or SIGINT; log the bound address (port 0 picks a free one)."""
    runner = web.AppRunner(make_app(settings), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls.context)
        await site.start()
        for address in runner.addresses:
            log.info("webhook listening on https://%s:%d/inject", address[0], address[1])
        await stop.wait()
    finally:
        await runner.cleanup()
