"""Log lines: ``log_format: json`` writes one JSON object per line (time, level, logger, message,
request_id where there is one); text stays the default; neither ever carries an error's message."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import load
from sidecar.errors import ConfigError
from sidecar.logs import REQUEST_ID, JsonFormatter, configure
from tests.servers import free_ports
from tests.sidecar_proc import SidecarProcess, wait_until

FIELDS = {"time", "level", "logger", "message"}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def _utc(stamp: str) -> datetime:
    assert stamp.endswith("Z"), stamp
    moment = datetime.fromisoformat(stamp)
    assert moment.utcoffset() is not None and moment.utcoffset() == UTC.utcoffset(None)
    return moment


def _logger(stream: io.StringIO) -> logging.Logger:
    """A logger of its own writing JSON to ``stream`` (the root logger is the test runner's)."""
    logger = logging.getLogger(f"sidecar.test_logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.handlers = [handler]
    return logger


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _run(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """`sidecar run` in front of a port nothing listens on, until it has said it listens and that the
    model server is unavailable; then SIGTERM. Returns its log lines (stdout and stderr)."""
    (nobody,) = free_ports(1)
    proc = SidecarProcess(f"http://127.0.0.1:{nobody}", tmp_path, protocol="triton", wait="listening",
                          extra_args=["--set", "shutdown_delay=0", "--set", "shutdown_grace=1"], env=env)
    with proc:
        wait_until(lambda: "unavailable" in proc.log_path.read_text(), 30, "the upstream warning")
        assert proc.stop(30) == 0
    lines = proc.log_path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("=== ")]  # the harness's own header
    assert len(starts) == 1, lines
    return lines[starts[0] + 1:]


def test_sidecar_run_writes_json_lines(tmp_path: Path) -> None:
    lines = _run(tmp_path, {"SIDECAR_LOG_FORMAT": "json"})
    records = [json.loads(line) for line in lines]  # every line, none excepted
    for record in records:
        assert set(record) >= FIELDS and set(record) <= FIELDS | {"request_id", "exception", "stack"}, record
        assert all(isinstance(value, str) for value in record.values()), record
        _utc(record["time"])
    levels = {(r["logger"], r["level"]) for r in records}
    assert ("sidecar", "INFO") in levels and ("sidecar.health", "WARNING") in levels
    assert any(r["message"].startswith("listening:") for r in records)
    assert any(r["message"] == "stopped" for r in records)


def test_text_stays_the_default(tmp_path: Path) -> None:
    lines = _run(tmp_path, {})
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines
    assert load(None, {}, None).log_format == "text"


def test_log_format_is_checked() -> None:
    assert load(None, {"SIDECAR_LOG_FORMAT": "json"}, None).log_format == "json"
    with pytest.raises(ConfigError, match=r"log_format.*json"):
        load(None, {"SIDECAR_LOG_FORMAT": "xml"}, None)


def test_json_fields_and_request_id() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    log.info("no call %s", "here")
    token = REQUEST_ID.set("abc123")
    try:
        log.warning("during a call:\nsecond line, \u00e9, \udcff")
    finally:
        REQUEST_ID.reset(token)
    log.debug("given explicitly", extra={"request_id": "given"})
    first, second, third = _lines(stream)
    assert len(stream.getvalue().splitlines()) == 3  # a newline in a message stays inside its line
    assert first["message"] == "no call here" and "request_id" not in first and first["level"] == "INFO"
    assert second["request_id"] == "abc123" and second["message"].startswith("during a call:\nsecond line, \u00e9")
    assert (second["level"], second["logger"]) == ("WARNING", log.name)
    assert third["request_id"] == "given" and third["level"] == "DEBUG"
    assert abs((_utc(first["time"]) - datetime.now(UTC)).total_seconds()) < 60


def test_exceptions_keep_type_and_frames_not_their_message() -> None:
    """As logs.where(): an exception's message may quote a payload or a credential."""
    stream = io.StringIO()
    log = _logger(stream)

    secret = "".join(["s3", "cret"])  # frames show source lines: the value must exist only at run time

    def fails() -> None:
        raise ValueError(f"Bearer {secret} in the body")

    try:
        fails()
    except ValueError:
        log.exception("it failed")
    (record,) = _lines(stream)
    assert record["message"] == "it failed"
    assert record["exception"].startswith("ValueError\n") and "in fails" in record["exception"]
    assert "s3cret" not in stream.getvalue()


async def test_request_id_follows_the_call_into_its_tasks() -> None:
    """Set once at the edge, the id reaches tasks the call starts, and nothing outside the call."""
    stream = io.StringIO()
    log = _logger(stream)

    async def call(request_id: str) -> None:
        REQUEST_ID.set(request_id)
        await asyncio.create_task(_log_later(log, "in a task"))
        log.info("in the call")

    await asyncio.gather(asyncio.create_task(call("one")), asyncio.create_task(call("two")))
    log.info("outside")
    records = _lines(stream)
    assert sorted((r["message"], r.get("request_id")) for r in records) == [
        ("in a task", "one"), ("in a task", "two"), ("in the call", "one"), ("in the call", "two"),
        ("outside", None)]


async def _log_later(log: logging.Logger, message: str) -> None:
    await asyncio.sleep(0)
    log.info(message)


def test_configure_picks_the_format() -> None:
    """configure() is what `sidecar run` calls; here on a fresh root logger, restored after."""
    def run(fmt: str) -> str:
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        root.handlers = []
        stream = io.StringIO()
        try:
            configure("info", fmt, stream)
            logging.getLogger("sidecar.x").info("hello")
            logging.getLogger("sidecar.x").debug("not at info")
        finally:
            root.handlers, level = saved
            root.setLevel(level)
        return stream.getvalue()

    assert json.loads(run("json"))["message"] == "hello"
    assert TEXT_LINE.match(run("text")) and run("text").endswith("sidecar.x: hello\n")
