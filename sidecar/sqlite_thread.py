"""One SQLite connection owned by one worker thread, for the embedded stores (traffic memory, forecast history).

The event loop never waits on SQLite: every job runs on the thread that opened the connection. A failing
file (a full disk, a lock held too long) makes a job return None instead of raising: the stores are caches
the sidecar carries on without, so an outage is logged once when it starts and once when it ends. A
connection that could not be opened is tried again by the next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("sidecar.sqlite")


def error_text(error: BaseException) -> str:
    # Type and a bounded message: SQLite errors name files, never payloads.
    return f"{type(error).__name__}: {str(error)[:200]}"


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """One transaction on a connection opened with ``isolation_level=None``: committed, or rolled back."""
    db.execute(begin)
    try:
        yield
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SQLiteThread:
    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection], thread: str) -> None:
        """``name`` says what the file is in log lines (``traffic store /data/traffic.db``); ``connect`` opens
        the connection, on the worker thread (named ``thread``). Raises what the first ``connect`` raised."""
        self.name = name
        self.closed = False
        self._connect = connect
        self._db: sqlite3.Connection | None = None
        self._up = True
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread)
        try:
            self._executor.submit(self._open).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def __repr__(self) -> str:
        return f"<SQLiteThread {self.name}{'' if self._up else ' down'}{' closed' if self.closed else ''}>"

    async def run(self, what: str, job: Callable[[sqlite3.Connection], T]) -> T | None:
        """``job(connection)`` on the worker thread; None once closed, or if SQLite fails (logged once an outage)."""
        if self.closed:
            return None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._with_db, job)
        except (sqlite3.Error, OSError) as error:
            if self._up:
                log.warning("%s unavailable (%s during %s); carrying on without it until it returns",
                            self.name, error_text(error), what)
            self._up = False
            return None
        if not self._up:
            log.info("%s available again", self.name)
        self._up = True
        return result

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(sqlite3.Error):
            await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=False)

    # -- on the worker thread

    def _with_db(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._open()  # an earlier open failed: the file may be usable again
        assert self._db is not None
        return job(self._db)

    def _open(self) -> None:
        self._db = self._connect()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
