"""Opening the history where the configuration says, and ``sidecar history import`` / ``export``.

    sidecar history import FILE.csv [--config ... --store ... --set forecast.history=...]
    sidecar history export [-o FILE.csv] [--model M ...] [--since TIME] [--until TIME]

Import is all-or-nothing (the whole file is checked first, csvio.py) and idempotent: each row *sets* its
minute (``History.replace``), so importing a file twice changes nothing. Rows older than
``forecast.history`` are skipped (they would be deleted at once). Export writes every recorded minute of
every model (or ``--model``), zeros included: importing an export gives the same history.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..config import ForecastConfig
from ..errors import ConfigError
from ..redis.breaker import Breaker
from ..redis.client import RedisClient
from ..redis.urls import is_redis, redact
from .csvio import CsvError, Rows, parse_minute, read_rows, write_rows
from .history import DAY_MINUTES, History, HistoryLimits, MinuteSeries
from .history_redis import RedisHistory
from .history_sqlite import SQLiteHistory

__all__ = ["add_parser", "export_csv", "history_location", "import_rows", "load_rows", "open_history", "run"]

IMPORT_CHUNK = 50_000  # rows per write while importing (one transaction / one pipeline each)
EXIT_USAGE = 2
Clock = Callable[[], float]


def history_location(cfg: ForecastConfig, traffic_store: str) -> str:
    """``forecast.store``, or else the traffic store's Redis, or history.db beside its SQLite file."""
    if cfg.store:
        return cfg.store
    if is_redis(traffic_store):
        return traffic_store
    return str(Path(traffic_store).with_name("history.db"))


def limits_from(cfg: ForecastConfig) -> HistoryLimits:
    return HistoryLimits(retention=cfg.history, max_models=cfg.max_models, namespace=cfg.namespace)


def open_history(cfg: ForecastConfig, location: str, *, client: Any = None, recording: bool = True,
                 clock: Clock = time.time) -> History:
    """The history at ``location``. A Redis location uses ``client`` (the sidecar's shared client) when
    given; otherwise the caller must close the client this opens (``history_client``)."""
    limits = limits_from(cfg)
    if is_redis(location):
        if client is None:
            raise ValueError("a Redis history needs a client: open one with history_client()")
        return RedisHistory(client, limits, clock=clock, label=f"redis {redact(location)}", recording=recording)
    return SQLiteHistory(location, limits, clock=clock, recording=recording)


def history_client(location: str) -> RedisClient:
    """A client of its own for the offline commands (an import writes large pipelines: long socket timeouts)."""
    try:
        return RedisClient(location, Breaker(3, 2.0), connect_timeout=2.0, socket_timeout=30.0)
    except ValueError as error:
        raise ConfigError(f"forecast history: unusable Redis URL: {error}") from None


# -- the subcommands --------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               config_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """``sidecar history import|export``; ``config_flags`` adds the usual --config/--store/--set."""
    history = sub.add_parser("history", help="import or export the per-model, per-minute call history (CSV)")
    actions = history.add_subparsers(dest="history_command", required=True)
    imp = actions.add_parser("import", help="add a CSV file (timestamp,model,requests) to the history")
    imp.add_argument("file", help="CSV file; - is stdin")
    config_flags(imp)
    exp = actions.add_parser("export", help="write the history as CSV (timestamp,model,requests)")
    exp.add_argument("-o", "--output", default="-", metavar="FILE", help="where to write; - is stdout")
    exp.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    exp.add_argument("--since", help="first minute (ISO 8601 with zone, or epoch seconds); default: all kept")
    exp.add_argument("--until", help="end, exclusive (same forms); default: now")
    config_flags(exp)


@dataclass(frozen=True)
class ImportReport:
    rows: int
    models: int
    skipped_old: int


def run(ns: argparse.Namespace, cfg: ForecastConfig, traffic_store: str, *, clock: Clock = time.time,
        stdout: TextIO | None = None) -> int:
    """The ``history`` subcommand; returns the exit status (2: a refused file or argument)."""
    out = stdout or sys.stdout
    if ns.history_command == "import":
        try:
            rows = load_rows(ns.file, clock)
        except (CsvError, OSError) as error:
            print(f"sidecar history import: {ns.file}: nothing imported:\n{error}", file=sys.stderr)
            return EXIT_USAGE
        return asyncio.run(_with_history(cfg, traffic_store, clock, lambda h: _import(h, rows, out, clock)))
    try:
        since = parse_minute(ns.since) if ns.since else None
        until = parse_minute(ns.until) if ns.until else None
    except ValueError as error:
        print(f"sidecar history export: {error}", file=sys.stderr)
        return EXIT_USAGE

    async def export(history: History, file: TextIO) -> int:
        await export_csv(history, file, models=ns.model or None, since=since, until=until, clock=clock)
        return 0

    if ns.output == "-":
        return asyncio.run(_with_history(cfg, traffic_store, clock, lambda h: export(h, out)))
    with open(ns.output, "w", newline="") as file:
        return asyncio.run(_with_history(cfg, traffic_store, clock, lambda h: export(h, file)))


async def _with_history(cfg: ForecastConfig, traffic_store: str, clock: Clock,
                        job: Callable[[History], Awaitable[int]]) -> int:
    location = history_location(cfg, traffic_store)
    async with AsyncExitStack() as stack:
        client = None
        if is_redis(location):
            own = history_client(location)
            stack.push_async_callback(own.close)
            client = own.redis
        history = open_history(cfg, location, client=client, recording=False, clock=clock)
        stack.push_async_callback(history.close)
        return await job(history)


async def _import(history: History, rows: Rows, out: TextIO, clock: Clock) -> int:
    report = await import_rows(history, rows, clock=clock)
    if history.dropped:
        print(f"sidecar history import: {history.describe()} was unavailable; nothing or part of the file was "
              "written: import it again (rows set their minute, so a second import is safe)", file=sys.stderr)
        return 1
    skipped = f" ({report.skipped_old} rows older than forecast.history skipped)" if report.skipped_old else ""
    print(f"imported {report.rows} rows of {report.models} models into {history.describe()}{skipped}", file=out)
    return 0


def load_rows(path: str, clock: Clock = time.time) -> Rows:
    """The CSV file (``-``: stdin) checked whole; :class:`CsvError` lists what is wrong."""
    now_minute = int(clock() // 60)
    if path == "-":
        return read_rows(sys.stdin, now_minute=now_minute)
    with open(path, newline="") as file:
        return read_rows(file, now_minute=now_minute)


async def import_rows(history: History, rows: Rows, *, clock: Clock = time.time) -> ImportReport:
    """Sets each row's minute in ``history``, a chunk of rows per write; rows past the retention skipped."""
    oldest = int(clock() // 60) - history.limits.retention_minutes
    written = skipped = 0
    for model, minute, count in rows:
        if minute < oldest:
            skipped += 1
            continue
        history.replace(model, minute, count)
        written += 1
        if written % IMPORT_CHUNK == 0:
            await history.flush()
    await history.flush()
    return ImportReport(written, len(rows.minutes), skipped)


async def export_csv(history: History, out: TextIO, *, models: list[str] | None = None, since: int | None = None,
                     until: int | None = None, clock: Clock = time.time) -> int:
    now_minute = int(clock() // 60)
    end = min(until, now_minute + 1) if until is not None else now_minute + 1
    start = max(since if since is not None else 0, now_minute - history.limits.retention_minutes)
    names = models if models is not None else sorted(await history.models())
    written = write_rows(out, [])
    for model in names:
        for day_start in range(start - start % DAY_MINUTES, end, DAY_MINUTES):  # a day at a time: bounded
            lo, hi = max(start, day_start), min(end, day_start + DAY_MINUTES)
            written += write_rows(out, _rows(model, await history.series(model, lo, hi)), header=False)
    return written


def _rows(model: str, series: MinuteSeries) -> Iterator[tuple[int, str, int]]:
    for i in np.flatnonzero(~np.isnan(series.counts)):
        yield series.start + int(i), model, int(series.counts[i])
