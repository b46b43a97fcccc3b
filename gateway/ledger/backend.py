"""What a ledger database must do: create its table, insert batches, answer grouped queries.

The SQL is shared between SQLite and PostgreSQL; a backend only supplies its connection, its
parameter marker and the expression that truncates ``ts`` to a time bucket. Every method is
synchronous and is called from the writer thread or through ``asyncio.to_thread``, never on the
event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.ledger.row import COLUMNS, STORED_COLUMNS, Row

#: The ledger table's indexes: name (after the table's), "UNIQUE " or "", columns.
_INDEXES = (
    ("row_id", "UNIQUE ", "row_id"),
    ("ts", "", "ts"),
    ("tenant_ts", "", "tenant, ts"),
    ("user_ts", "", "user_id, ts"),
)

_TYPES = {
    "ts": "DOUBLE PRECISION NOT NULL", "day": "TEXT NOT NULL", "status": "INTEGER NOT NULL",
    "endpoint": "TEXT NOT NULL", "model": "TEXT NOT NULL", "request_id": "TEXT NOT NULL",
    "blocked": "INTEGER", "limited": "INTEGER", "stream": "INTEGER",
    "client_disconnected": "INTEGER", "attempts": "INTEGER", "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT", "tokens_estimated": "INTEGER", "cost_usd": "DOUBLE PRECISION",
    "ms_total": "DOUBLE PRECISION", "ms_upstream": "DOUBLE PRECISION",
    "ms_ttft": "DOUBLE PRECISION", "cached_tokens": "BIGINT", "cache_write_tokens": "BIGINT",
}  # fmt: skip

#: A request that failed: an error status, or an error after a 200 began (a stream the upstream
#: cut, stalled or ended with an error event, an answer the output guard stopped, a shutdown
#: cutting it: ``error_type`` set). A client that went away is no error of the gateway's: 499,
#: and a stream it left (200, ``client_disconnected``, no ``error_type``), are not counted.
FAILED = "((status >= 400 AND status <> 499) OR error_type IS NOT NULL)"

#: The sums every grouped query returns, in this order.
AGGREGATES = (
    "count(*)",
    "coalesce(sum(prompt_tokens), 0)",
    "coalesce(sum(completion_tokens), 0)",
    "coalesce(sum(cost_usd), 0)",
    f"coalesce(sum(CASE WHEN {FAILED} THEN 1 ELSE 0 END), 0)",
    "coalesce(sum(blocked), 0)",
    "coalesce(sum(limited), 0)",
    "coalesce(sum(cached_tokens), 0)",
    "coalesce(sum(cache_write_tokens), 0)",
)
AGGREGATE_NAMES = (
    "requests", "prompt_tokens", "completion_tokens", "cost_usd", "errors", "blocked", "limited",
    "cached_tokens", "cache_write_tokens",
)  # fmt: skip

#: The most groups one grouped query returns, and the most rows one export page holds (module
#: constants, read at each call: tests lower them). Past them an answer says it is truncated.
GROUP_LIMIT = 10_000
ROW_LIMIT = 100_000
_TS = COLUMNS.index("ts")


class Groups(list[dict[str, Any]]):
    """A grouped query's answer; ``truncated``: there were more groups than the limit."""

    truncated = False


#: Columns a query may group by (never a client-supplied string).
GROUPS = {"day": "day", "model": "model", "tenant": "tenant", "user": "user_id",
          "provider": "provider", "endpoint": "endpoint"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Filter:
    """Which rows a query covers: ``start <= ts < end`` and optionally one tenant / user."""

    start: float
    end: float
    tenant: str | None = None
    user: str | None = None


class Backend:
    """Base class of the SQLite and PostgreSQL backends."""

    marker = "?"
    kind = "base"

    def __init__(self, prefix: str) -> None:
        self.table = f"{prefix}usage"
        self.prefix = prefix

    # -- what a backend provides ---------------------------------------------------------------

    def connect(self) -> Any:
        raise NotImplementedError

    def bucket_expr(self, seconds: int) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the ledger lives, without credentials (for logs)."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------

    def indexes(self) -> dict[str, str]:
        """The ledger table's indexes: the ``CREATE`` statement by index name."""
        t = self.table
        return {
            f"{t}_{name}": f"CREATE {kind}INDEX IF NOT EXISTS {t}_{name} ON {t} ({columns})"
            for name, kind, columns in _INDEXES
        }

    def create_schema(self, conn: Any) -> None:
        cur = conn.cursor()
        cols = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in STORED_COLUMNS)
        cur.execute(f"CREATE TABLE IF NOT EXISTS {self.table} ({cols})")
        # A table made before a column existed gets it (old rows: NULL; NULL ids never conflict).
        cur.execute(f"SELECT * FROM {self.table} LIMIT 0")
        have = {d[0] for d in cur.description}
        for col in STORED_COLUMNS:
            if col not in have:
                cur.execute(f"ALTER TABLE {self.table} ADD COLUMN {col} {_TYPES.get(col, 'TEXT')}")
        # Only the missing indexes: even "CREATE INDEX IF NOT EXISTS" takes a lock on the table
        # that waits behind any open write (PostgreSQL), so a session left half-open by a network
        # cut, still holding its insert's lock, would stall every reconnect.
        existing = self.index_names(cur)
        for name, stmt in self.indexes().items():
            if name not in existing:
                cur.execute(stmt)
        conn.commit()

    def index_names(self, cur: Any) -> set[str]:
        """The indexes the ledger table has now."""
        raise NotImplementedError

    def insert(self, conn: Any, rows: list[Row]) -> None:
        """Insert a batch; rows already there (same ``row_id``: a retried batch whose first
        commit did land) are skipped."""
        marks = ", ".join([self.marker] * len(STORED_COLUMNS))
        sql = (f"INSERT INTO {self.table} ({', '.join(STORED_COLUMNS)}) VALUES ({marks}) "
               "ON CONFLICT (row_id) DO NOTHING")  # fmt: skip
        cur = conn.cursor()
        cur.executemany(sql, rows)
        conn.commit()

    def _where(self, flt: Filter) -> tuple[str, list[Any]]:
        m = self.marker
        clauses = [f"ts >= {m}", f"ts < {m}"]
        params: list[Any] = [flt.start, flt.end]
        if flt.tenant is not None:
            clauses.append(f"tenant = {m}")
            params.append(flt.tenant)
        if flt.user is not None:
            clauses.append(f"user_id = {m}")
            params.append(flt.user)
        return " AND ".join(clauses), params

    def query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(sql, params)
            return [tuple(r) for r in cur.fetchall()]
        finally:
            conn.close()

    def grouped(
        self, flt: Filter, keys: tuple[str, ...], *, bucket_s: int = 0, order_by_cost: bool = False,
        limit: int | None = None,
    ) -> Groups:  # fmt: skip
        """Sums per group. ``keys`` are names from ``GROUPS`` (plus ``bucket`` when
        ``bucket_s`` is set: the start of the time bucket, epoch seconds), in ascending order,
        or by cost (highest first). Past ``limit`` (default ``GROUP_LIMIT``) groups the answer
        is ``truncated``: it keeps the costliest, or else the latest (the newest days and
        buckets), never silently the oldest."""
        limit = GROUP_LIMIT if limit is None else limit
        exprs: list[str] = []
        for key in keys:
            exprs.append(self.bucket_expr(bucket_s) if key == "bucket" else GROUPS[key])
        where, params = self._where(flt)
        select = ", ".join([*exprs, *AGGREGATES])
        sql = f"SELECT {select} FROM {self.table} WHERE {where}"
        if exprs:
            positions = [str(i + 1) for i in range(len(exprs))]
            sql += f" GROUP BY {', '.join(positions)}"
            # Descending, reversed below: a cut keeps the latest groups.
            order = (
                [f"{len(exprs) + 4} DESC"] if order_by_cost else [f"{p} DESC" for p in positions]
            )
            sql += f" ORDER BY {', '.join(order)}"
        sql += f" LIMIT {int(limit) + 1}"
        rows = self.query(sql, params)
        out = Groups()
        out.truncated = len(rows) > limit
        rows = rows[:limit]
        if exprs and not order_by_cost:
            rows.reverse()
        for row in rows:
            item = dict(zip(keys, row[: len(keys)], strict=True))
            sums = row[len(keys) :]
            for name, value in zip(AGGREGATE_NAMES, sums, strict=True):
                item[name] = float(value) if name == "cost_usd" else int(value)
            out.append(item)
        return out

    def latencies(self, flt: Filter, limit: int = 20_000) -> list[tuple[str, float, float | None]]:
        """(model, ms_total, ms_ttft) of the latest successful requests, for percentiles."""
        where, params = self._where(flt)
        sql = (
            f"SELECT model, ms_total, ms_ttft FROM {self.table} WHERE {where} AND status < 400 "
            f"AND error_type IS NULL ORDER BY ts DESC LIMIT {int(limit)}"
        )
        return [(r[0], float(r[1]), None if r[2] is None else float(r[2]))
                for r in self.query(sql, params)]  # fmt: skip

    def rows(
        self, flt: Filter, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> tuple[list[tuple[Any, ...]], tuple[float, str] | None]:
        """One page of rows (``COLUMNS``), oldest first, after the cursor ``after`` (the
        ``(ts, row_id)`` of the last row of the previous page); and the cursor of this page's
        last row when more rows follow (else None). Pages hold ``limit`` (default
        ``ROW_LIMIT``) rows."""
        limit = ROW_LIMIT if limit is None else limit
        where, params = self._where(flt)
        if after is not None:
            m = self.marker
            # (Rows from before row_id existed have none: '' sorts them first at their ts.)
            where += f" AND (ts > {m} OR (ts = {m} AND coalesce(row_id, '') > {m}))"
            params += [after[0], after[0], after[1]]
        cols = ", ".join(COLUMNS)
        sql = (f"SELECT {cols}, coalesce(row_id, '') FROM {self.table} WHERE {where} "
               f"ORDER BY ts, coalesce(row_id, '') LIMIT {int(limit) + 1}")  # fmt: skip
        rows = self.query(sql, params)
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = (float(rows[-1][_TS]), str(rows[-1][-1])) if more and rows else None
        return [r[:-1] for r in rows], cursor

    def count(self) -> int:
        return int(self.query(f"SELECT count(*) FROM {self.table}", [])[0][0])

    def drop(self) -> None:
        """Drop the table (tests)."""
        conn = self.connect()
        try:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {self.table}")
            conn.commit()
        finally:
            conn.close()
