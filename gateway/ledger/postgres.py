"""PostgreSQL ledger (psycopg 3): one table shared by every replica."""

from __future__ import annotations

from typing import Any

from gateway.ledger.backend import Backend
from gateway.redact import url_for_logs


class PostgresBackend(Backend):
    kind = "postgres"
    marker = "%s"

    def __init__(
        self, url: str, prefix: str, connect_timeout_s: float = 3.0, lock_timeout_s: float = 5.0
    ) -> None:
        super().__init__(prefix)
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        #: How long a ledger statement may wait for a lock (PostgreSQL's ``lock_timeout``).
        self.lock_timeout_s = lock_timeout_s

    def describe(self) -> str:
        return url_for_logs(self.url)  # no user or password in logs

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(
            self.url,
            connect_timeout=max(1, int(self.connect_timeout_s)),
            autocommit=False,
            # A peer gone without a FIN (a cut network) is noticed in about a minute.
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        # Never wait forever for a lock: a write fails after lock_timeout_s and is retried
        # (the rows stay buffered) instead of stalling the writer thread.
        conn.execute(f"SET lock_timeout = '{max(1, round(self.lock_timeout_s * 1000))}ms'")
        conn.commit()
        return conn

    def index_names(self, cur: Any) -> set[str]:
        cur.execute(
            "SELECT indexname FROM pg_indexes"
            " WHERE schemaname = current_schema() AND tablename = %s",
            (self.table,),
        )
        return {row[0] for row in cur.fetchall()}

    def bucket_expr(self, seconds: int) -> str:
        s = int(seconds)
        return f"(floor(ts / {s}) * {s})::bigint"
