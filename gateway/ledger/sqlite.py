"""SQLite ledger: the default for one host (WAL mode, so several worker processes can write)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from gateway.ledger.backend import Backend


class SqliteBackend(Backend):
    kind = "sqlite"

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(prefix)
        # sqlite:///data/usage.db is relative to the working directory; sqlite:////abs/path.db
        self.path = Path(url.removeprefix("sqlite:///"))

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def index_names(self, cur: Any) -> set[str]:
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                    (self.table,))  # fmt: skip
        return {row[0] for row in cur.fetchall()}

    def bucket_expr(self, seconds: int) -> str:
        s = int(seconds)
        return f"CAST(ts / {s} AS INTEGER) * {s}"
