"""PostgreSQL ledger (psycopg 3): one table shared by every replica."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from gateway.ledger.backend import Backend


class PostgresBackend(Backend):
    kind = "postgres"
    marker = "%s"

    def __init__(self, url: str, prefix: str, connect_timeout_s: float = 3.0) -> None:
        super().__init__(prefix)
        self.url = url
        self.connect_timeout_s = connect_timeout_s

    def describe(self) -> str:
        where = urlsplit(self.url)  # no user or password in logs
        return f"postgresql://{where.hostname}:{where.port or 5432}{where.path}"

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.url, connect_timeout=max(1, int(self.connect_timeout_s)), autocommit=False
        )

    def bucket_expr(self, seconds: int) -> str:
        s = int(seconds)
        return f"(floor(ts / {s}) * {s})::bigint"
