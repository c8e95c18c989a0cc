"""Logging rules: no payloads, no credentials. An error is logged by its type and where it happened."""

from __future__ import annotations

import traceback


def where(error: BaseException) -> str:
    """The traceback frames of ``error`` without its message (which may quote request data)."""
    return "".join(traceback.format_tb(error.__traceback__)).rstrip()
