"""Logging rules: no payloads, no credentials. An error is logged by its type and where it happened.

Two line formats (``log_format``): ``text`` for people, ``json`` (one object per line) for the log
pipelines of clusters. The request a line belongs to comes from ``REQUEST_ID``, which the data
ports set for the call they are handling.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The id of the call being handled (x-request-id, given or made at the edge). A ContextVar follows
# the call into every coroutine and task it starts, with nothing passed through the stages.
REQUEST_ID: ContextVar[str] = ContextVar("sidecar_request_id", default="")


def where(error: BaseException) -> str:
    """The traceback frames of ``error`` without its message (which may quote request data)."""
    return "".join(traceback.format_tb(error.__traceback__)).rstrip()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, and request_id and
    exception when there are some. Never a newline inside a line, whatever the message holds."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            line["request_id"] = str(request_id)
        if record.exc_info and record.exc_info[1] is not None:
            line["exception"] = _exception(record.exc_info[1])
        if record.stack_info:
            line["stack"] = record.stack_info
        # ASCII escapes: a lone surrogate or control character in a message stays one valid line.
        return json.dumps(line, separators=(",", ":"))


def _exception(error: BaseException) -> str:
    """Type and frames, as where() logs them: an exception's message may quote what a client sent."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    frames = where(error)
    return f"{name}\n{frames}" if frames else name


def configure(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Root logging for a command: ``level`` (debug, info, ...) and the line format ``fmt`` (text, json)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
