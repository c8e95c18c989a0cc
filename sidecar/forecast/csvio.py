"""``sidecar history import`` / ``export`` file format: what a team's request logs become.

    timestamp,model,requests
    2026-11-23T09:00:00Z,minilm,1832
    1763888460,minilm,1790

One row per model per minute. ``timestamp`` is the minute's start, ISO 8601 with a time zone (``Z`` or
an offset) or epoch seconds, on a whole minute; ``requests`` the calls in that minute (0 included: it says
the minute was recorded and quiet). Parsing is strict and all-or-nothing: the header exactly as above,
three fields a row, no duplicate (model, minute), nothing in the future; every problem is reported with
its line number (the first ``MAX_ERRORS``) and nothing is imported. Bounded: lines of at most
``MAX_LINE`` characters, ``max_rows`` rows, model names of at most ``MAX_MODEL`` characters. Rows are
kept as packed arrays (24 bytes a row), so the default bound of 5 million rows (14 days of 250 models)
holds in about 120 MiB.
"""

from __future__ import annotations

import csv
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import numpy as np

__all__ = ["HEADER", "CsvError", "Rows", "format_minute", "parse_minute", "read_rows", "write_rows"]

HEADER = ("timestamp", "model", "requests")
MAX_LINE = 4096
MAX_MODEL = 256
MAX_ERRORS = 20
MAX_ROWS = 5_000_000
MAX_COUNT = 2**32 - 1
_EPOCH = re.compile(r"\d{1,12}(?:\.0*)?")
_COUNT = re.compile(r"\d{1,10}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Epoch seconds outside 2000..3000 are a unit mistake (milliseconds read as seconds, days, ...).
_OLDEST, _NEWEST = 946_684_800, 32_503_680_000


class CsvError(ValueError):
    """The file was refused; ``problems`` lists each one as ``line N: what``."""

    def __init__(self, problems: list[str], truncated: bool = False) -> None:
        self.problems = problems
        more = f"\n(stopped after {len(problems)} problems)" if truncated else ""
        super().__init__("\n".join(problems) + more)


@dataclass
class Rows:
    """Parsed rows, packed per model: minutes and counts in arrays (line numbers kept for messages)."""

    minutes: dict[str, array[int]] = field(default_factory=dict)
    counts: dict[str, array[int]] = field(default_factory=dict)
    lines: dict[str, array[int]] = field(default_factory=dict)

    def append(self, model: str, minute: int, count: int, line: int) -> None:
        if model not in self.minutes:
            self.minutes[model], self.counts[model], self.lines[model] = array("q"), array("q"), array("q")
        self.minutes[model].append(minute)
        self.counts[model].append(count)
        self.lines[model].append(line)

    def __len__(self) -> int:
        return sum(len(m) for m in self.minutes.values())

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        for model, minutes in self.minutes.items():
            counts = self.counts[model]
            for i, minute in enumerate(minutes):
                yield model, minute, counts[i]

    def duplicates(self) -> list[str]:
        """``line N: ...`` for each row repeating an earlier (model, minute)."""
        problems = []
        for model, minutes in self.minutes.items():
            m = np.frombuffer(minutes, dtype=np.int64)
            order = np.argsort(m, kind="stable")
            repeated = np.flatnonzero(np.diff(m[order]) == 0)
            lines = self.lines[model]
            for k in repeated:
                first, again = lines[int(order[k])], lines[int(order[k + 1])]
                problems.append(f"line {again}: model {model!r} at {format_minute(int(m[order[k]]))} "
                                f"repeats line {first}")
        return sorted(problems, key=lambda p: int(p.split(":")[0].split()[1]))


def parse_minute(text: str) -> int:
    """Minutes since the epoch from ISO 8601 with a zone, or epoch seconds; ValueError says what is wrong."""
    text = text.strip()
    if _EPOCH.fullmatch(text):
        seconds = int(text.split(".")[0])
    else:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"timestamp {text!r} is neither ISO 8601 nor epoch seconds") from None
        if when.tzinfo is None:
            raise ValueError(f"timestamp {text!r} has no time zone (add Z or an offset such as +01:00)")
        if when.second or when.microsecond:
            raise ValueError(f"timestamp {text!r} is not on a whole minute")
        seconds = int(when.timestamp())
    if seconds % 60:
        raise ValueError(f"timestamp {text!r} is not on a whole minute")
    if not _OLDEST <= seconds < _NEWEST:
        raise ValueError(f"timestamp {text!r} is not between 2000 and 3000 (milliseconds, or another unit?)")
    return seconds // 60


def format_minute(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lines(source: TextIO) -> Iterator[tuple[int, str | None]]:
    """(line number, text without its line end); None for a line over MAX_LINE, never held whole."""
    number = 0
    while chunk := source.readline(MAX_LINE + 2):
        number += 1
        text = chunk.rstrip("\r\n")
        if len(text) <= MAX_LINE:
            yield number, text
            continue
        while chunk and not chunk.endswith("\n"):  # skip the rest of the long line
            chunk = source.readline(MAX_LINE)
        yield number, None


def read_rows(source: TextIO, *, now_minute: int, max_rows: int = MAX_ROWS) -> Rows:
    """All rows of ``source``, or :class:`CsvError` listing what is wrong (nothing is half-read)."""
    rows = Rows()
    problems: list[str] = []
    lines = _lines(source)
    header = next(lines, None)
    if header is None:
        raise CsvError(["line 1: empty file; expected the header timestamp,model,requests"])
    text = (header[1] or "").removeprefix("\ufeff")  # a spreadsheet's byte order mark
    if tuple(f.strip() for f in text.split(",")) != HEADER:
        raise CsvError([f"line 1: header must be exactly {','.join(HEADER)}, got {text[:100]!r}"])
    for number, line in lines:
        if len(problems) >= MAX_ERRORS:
            raise CsvError(problems, truncated=True)
        problem = _row(rows, number, line, now_minute)
        if problem:
            problems.append(f"line {number}: {problem}")
        elif len(rows) > max_rows:
            problems.append(f"line {number}: more than {max_rows} rows (raise the limit or split the file)")
            raise CsvError(problems, truncated=True)
    problems += rows.duplicates()
    if problems:
        raise CsvError(problems[:MAX_ERRORS], truncated=len(problems) > MAX_ERRORS)
    return rows


def _row(rows: Rows, number: int, line: str | None, now_minute: int) -> str | None:
    """Parses one line into ``rows``; returns what is wrong with it, if anything."""
    if line is None:
        return f"longer than {MAX_LINE} characters"
    if not line.strip():
        return "empty line"
    try:
        fields = next(csv.reader([line], strict=True))
    except csv.Error as error:
        return f"not CSV ({error})"
    if len(fields) != 3:
        return f"expected 3 fields (timestamp,model,requests), got {len(fields)}"
    stamp, model, requests = fields
    try:
        minute = parse_minute(stamp)
    except ValueError as error:
        return str(error)
    if minute > now_minute:
        return f"timestamp {stamp.strip()!r} is in the future"
    if not model or len(model) > MAX_MODEL or _CONTROL.search(model) or model != model.strip():
        return f"model name must be 1 to {MAX_MODEL} characters, no control characters or surrounding spaces"
    requests = requests.strip()
    if not _COUNT.fullmatch(requests) or int(requests) > MAX_COUNT:
        return f"requests {requests[:20]!r} is not a whole number from 0 to {MAX_COUNT}"
    rows.append(model, minute, int(requests), number)
    return None


def write_rows(out: TextIO, rows: Iterable[tuple[int, str, int]], *, header: bool = True) -> int:
    """Writes the header (unless ``header`` is false) and ``(minute, model, requests)`` rows; returns the
    rows written."""
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(HEADER)
    written = 0
    for minute, model, count in rows:
        writer.writerow((format_minute(minute), model, count))
        written += 1
    return written
