"""The batching writer: rows go into a bounded in-memory buffer on the request path (an append)
and a background thread writes them in batches, retrying while the database is unreachable.

A thread rather than an asyncio task because both sqlite3 and psycopg are blocking: the event
loop never waits on the database. ``close`` writes what is left (bounded by a timeout) so a
graceful shutdown loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from gateway import metrics as core_metrics
from gateway.ledger import metrics
from gateway.ledger.backend import Backend
from gateway.ledger.row import Row

log = logging.getLogger("gateway.ledger")

_MAX_BACKOFF_S = 5.0


class LedgerWriter:
    def __init__(
        self, backend: Backend, *, batch_size: int = 200, flush_interval_s: float = 1.0,
        max_buffer: int = 100_000,
    ) -> None:  # fmt: skip
        self.backend = backend
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self._buf: deque[Row] = deque()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self._deadline = 0.0
        self._submitted = 0
        self._settled = 0  # written or dropped
        self._conn: Any = None
        self._healthy = True
        self._thread: threading.Thread | None = None
        core_metrics.track_ledger(self)  # (gateway_ledger_buffered_rows reads ``pending``)

    # -- request path ----------------------------------------------------------------------------

    def submit(self, row: Row) -> None:
        """Queue one row; never blocks, never raises."""
        with self._cond:
            self._submitted += 1
            if len(self._buf) >= self.max_buffer:
                self._settled += 1
                metrics.LEDGER_DROPPED.labels("buffer_full").inc()
                return
            self._buf.append(row)
            n = len(self._buf)
        if n >= self.batch_size:
            self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def pending(self) -> int:
        """Rows submitted but not yet written (or dropped)."""
        return self._submitted - self._settled

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gateway-ledger", daemon=True)
        self._thread.start()

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every row submitted before the call is written (or dropped)."""
        with self._cond:
            target = self._submitted
        self._wake.set()
        end = time.monotonic() + timeout
        with self._cond:
            while self._settled < target:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
                self._wake.set()
        return True

    def close(self, timeout: float) -> None:
        """Write what is left (for at most ``timeout`` seconds), then stop the thread."""
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 5)
            self._thread = None
        with self._cond:
            lost = len(self._buf)
            self._buf.clear()
            self._settled += lost
            self._cond.notify_all()
        if lost:
            metrics.LEDGER_DROPPED.labels("shutdown").inc(lost)
            log.error("ledger rows lost at shutdown", extra={"rows": lost})
        self._disconnect()

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.0
        while True:
            self._wake.wait(backoff or self.flush_interval_s)
            self._wake.clear()
            ok = self._drain()
            if self._stopping and (not self._buf or time.monotonic() >= self._deadline):
                return
            if ok:
                backoff = 0.0
            else:
                backoff = min(_MAX_BACKOFF_S, max(0.1, backoff * 2))
                if self._stopping:
                    # Keep trying until the shutdown deadline, without sleeping past it.
                    backoff = min(backoff, max(0.01, self._deadline - time.monotonic()))

    def _drain(self) -> bool:
        while True:
            with self._cond:
                if not self._buf:
                    return True
                n = min(self.batch_size, len(self._buf))
                batch = [self._buf.popleft() for _ in range(n)]
            try:
                self._write(batch)
            except Exception as e:
                with self._cond:
                    self._buf.extendleft(reversed(batch))  # back in front, order kept
                metrics.LEDGER_ERRORS.labels(type(e).__name__).inc()
                self._disconnect()
                if self._healthy:
                    self._healthy = False
                    log.error(
                        "ledger write failed; buffering and retrying",
                        extra={"ledger": self.backend.describe(), "error": type(e).__name__,
                               "buffered": len(self._buf)},
                    )  # fmt: skip
                return False
            with self._cond:
                self._settled += len(batch)
                self._cond.notify_all()
            metrics.LEDGER_WRITTEN.inc(len(batch))
            if not self._healthy:
                self._healthy = True
                log.info("ledger writes resumed", extra={"ledger": self.backend.describe()})

    def _write(self, batch: list[Row]) -> None:
        if self._conn is None:
            conn = self.backend.connect()
            try:
                self.backend.create_schema(conn)
            except Exception:
                conn.close()
                raise
            self._conn = conn
        self.backend.insert(self._conn, batch)

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
