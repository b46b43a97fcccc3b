"""The durable usage ledger: one row per request (who, model, tokens, cost, status, latency).

``Ledger.observe`` is a gateway observer: it turns the request log record into a row and hands
it to the batching writer (an append; the database is written by a background thread). Reads
(the usage API, the dashboard) run in a worker thread with their own connection.

    ledger:
      url: sqlite:///./data/usage.db      # or postgresql://user@host:5432/db, or none
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError, ServiceUnavailableError
from gateway.ledger import query
from gateway.ledger.backend import Backend, Filter, Groups
from gateway.ledger.postgres import PostgresBackend
from gateway.ledger.row import COLUMNS, row_from
from gateway.ledger.sqlite import SqliteBackend
from gateway.ledger.writer import LedgerWriter
from gateway.plugin import StartupError

if TYPE_CHECKING:
    from gateway.config import LedgerConfig
    from gateway.context import RequestContext

__all__ = ["COLUMNS", "Backend", "Filter", "Ledger", "make_backend"]

log = logging.getLogger("gateway.ledger")


def make_backend(url: str, prefix: str) -> Backend:
    if url.startswith("sqlite:///"):
        return SqliteBackend(url, prefix)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url, prefix)
    raise ValueError(f"unsupported ledger url scheme: {url.split(':', 1)[0]!r}")


class Ledger:
    def __init__(self, config: LedgerConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend or make_backend(config.url, config.table_prefix)
        self.writer = LedgerWriter(
            self.backend,
            batch_size=config.batch_size,
            flush_interval_s=config.flush_interval_s,
            max_buffer=config.max_buffer,
        )

    async def start(self) -> None:
        """Create the table now, so a wrong SQLite path fails at startup; an unreachable
        PostgreSQL only warns (rows are buffered until it answers)."""
        try:
            await asyncio.to_thread(self._create)
        except Exception as e:
            if self.backend.kind == "sqlite":
                raise StartupError(
                    f"ledger: cannot open {self.backend.describe()}: {type(e).__name__}: {e}"
                ) from None
            log.warning(
                "ledger database unreachable at startup; buffering until it answers",
                extra={"ledger": self.backend.describe(), "error": type(e).__name__},
            )
        self.writer.start()
        log.info("ledger ready", extra={"ledger": self.backend.describe()})

    def _create(self) -> None:
        conn = self.backend.connect()
        try:
            self.backend.create_schema(conn)
        finally:
            conn.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.close, self.config.shutdown_timeout_s)

    def observe(self, ctx: RequestContext, record: dict[str, Any]) -> None:
        self.writer.submit(row_from(record))

    async def settle(self, wait_s: float = 2.0) -> bool:
        """Wait (bounded) until rows submitted so far are in the database: the API then reads
        its own writes."""
        if not self.writer.pending:
            return True
        return await asyncio.to_thread(self.writer.wait_settled, wait_s)

    async def usage(self, flt: Filter) -> Groups:
        return await self._read(query.usage_by_day_model, self.backend, flt)  # type: ignore[no-any-return]

    async def summary(self, flt: Filter, bucket_s: int, strict: bool = False) -> dict[str, Any]:
        """``strict``: refuse (400) a range with more points than one answer holds."""
        return await self._read(query.summary, self.backend, flt, bucket_s, 20, strict)  # type: ignore[no-any-return]

    async def rows(
        self, flt: Filter, after: tuple[float, str] | None = None
    ) -> tuple[list[tuple[Any, ...]], tuple[float, str] | None]:
        return await self._read(self.backend.rows, flt, after)  # type: ignore[no-any-return]

    async def _read(self, fn: Any, *args: Any) -> Any:
        """Run a read query in a thread; a database that does not answer is a 503 with
        Retry-After for the caller and one warning in the log (not a 500 and a traceback)."""
        await self.settle()
        try:
            return await asyncio.to_thread(fn, *args)
        except GatewayError:
            raise  # the request's own mistake (a 400), not the database's
        except Exception as e:
            log.warning(
                "ledger read failed",
                extra={"ledger": self.backend.describe(), "error": type(e).__name__},
            )
            raise ServiceUnavailableError(
                "The usage ledger is unavailable; please retry shortly.",
                headers={"retry-after": "5"},
            ) from None
