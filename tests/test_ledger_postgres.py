"""The ledger on the real PostgreSQL server (127.0.0.1:5432, or DATABASE_URL): writes and grouped
queries, several writers sharing one table, and an outage: rows are buffered while the server is
unreachable and written once it answers again. Each test uses its own table prefix and drops it."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from gateway.config import LedgerConfig
from gateway.ledger import Filter, Ledger
from gateway.ledger import metrics as lm
from gateway.ledger.postgres import PostgresBackend
from gateway.ledger.row import row_from
from tests.test_ledger import record

URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
DAY = 86_400


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"t{secrets.token_hex(4)}_"
    yield p
    PostgresBackend(URL, p).drop()


class Switch:
    """A TCP forwarder to the real server that can be cut (connections refused and reset).

    A connection is registered under the lock before it may carry data, and cut() closes every
    registered one under the same lock: a connection accepted while the switch is being cut is
    either closed by cut() or sees ``up`` false and closes itself, never left half-open (a
    server session left waiting mid-statement keeps its locks until TCP keepalive ends it).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target) if self.up else None
            except OSError:
                server = None
            with self.lock:
                if server is None or not self.up:
                    for s in (client, server):
                        if s is not None:
                            s.close()
                    continue
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            self.up = False
            conns, self.conns = self.conns, []
        for s in conns:  # the pipes see the end of their sockets and close them
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self.sock.close()


def via(port: int, url: str = URL) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{port}"))


def wait_for(cond: Any, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.anyio
async def test_postgres_ledger_writes_and_groups(prefix: str) -> None:
    cfg = LedgerConfig(url=URL, table_prefix=prefix, flush_interval_s=0.05)
    ledgers = [Ledger(cfg), Ledger(cfg)]  # two replicas sharing one table
    for ledger in ledgers:
        await ledger.start()
    now = time.time()
    for i in range(30):
        ledgers[i % 2].observe(None, record(  # type: ignore[arg-type]
            request_id=f"p{i}", ts=now, user="alice" if i < 20 else "bob",
            model_name="demo" if i % 3 else "big", cost_usd=0.01, prompt_tokens=7,
            cached_tokens=5, cache_write_tokens=1,
        ))  # fmt: skip
    for ledger in ledgers:
        await ledger.close()
    backend = PostgresBackend(URL, prefix)
    assert backend.count() == 30
    flt = Filter(now - DAY, now + DAY)
    by_model = {r["model"]: r for r in backend.grouped(flt, ("model",))}
    assert by_model["big"]["requests"] == 10 and by_model["demo"]["requests"] == 20
    assert by_model["demo"]["prompt_tokens"] == 140
    assert (by_model["demo"]["cached_tokens"], by_model["demo"]["cache_write_tokens"]) == (100, 20)
    alice = backend.grouped(Filter(now - DAY, now + DAY, user="alice"), ())[0]
    assert alice["requests"] == 20 and alice["cost_usd"] == pytest.approx(0.2)
    buckets = backend.grouped(flt, ("bucket",), bucket_s=3600)
    assert len(buckets) == 1 and buckets[0]["bucket"] == int(now // 3600 * 3600)


@pytest.mark.anyio
async def test_postgres_outage_buffers_then_catches_up(prefix: str) -> None:
    target = urlsplit(URL)
    switch = Switch((target.hostname or "127.0.0.1", target.port or 5432))
    cfg = LedgerConfig(url=via(switch.port), table_prefix=prefix, flush_interval_s=0.05)
    ledger = Ledger(cfg)
    try:
        await ledger.start()
        now = time.time()
        ledger.observe(None, record(request_id="before", ts=now))  # type: ignore[arg-type]
        assert await ledger.settle(5)
        switch.cut()
        dropped = lm.LEDGER_DROPPED.labels("buffer_full")._value.get()
        errors_before = sum(
            s.value for m in lm.LEDGER_ERRORS.collect() for s in m.samples
            if s.name.endswith("_total")
        )  # fmt: skip
        for i in range(50):
            ledger.observe(None, record(request_id=f"during{i}", ts=now))  # type: ignore[arg-type]
        wait_for(lambda: sum(
            s.value for m in lm.LEDGER_ERRORS.collect() for s in m.samples
            if s.name.endswith("_total")
        ) > errors_before)  # fmt: skip
        assert ledger.writer.pending == 50  # held in memory, nothing dropped
        assert lm.LEDGER_DROPPED.labels("buffer_full")._value.get() == dropped
        switch.up = True
        assert await ledger.settle(15)
    finally:
        await ledger.close()
        switch.close()
    backend = PostgresBackend(URL, prefix)
    assert backend.count() == 51


@pytest.mark.anyio
async def test_postgres_down_at_startup_does_not_stop_the_gateway(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    url = f"postgresql://ledger:CANARYpassword@127.0.0.1:{port}/test"
    ledger = Ledger(
        LedgerConfig(url=url, table_prefix=prefix, flush_interval_s=0.05, shutdown_timeout_s=0.3)
    )
    assert "CANARY" not in repr(ledger.config)
    caplog.set_level("INFO", logger="gateway.ledger")
    await ledger.start()  # warns, does not raise
    assert "unreachable at startup" in caplog.text
    ledger.observe(None, record())  # type: ignore[arg-type]
    assert ledger.writer.pending == 1
    await ledger.close()  # shutdown timeout passes: the row is counted as dropped
    assert ledger.writer.pending == 0
    logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert "CANARY" not in logged and "rows lost at shutdown" in logged


def test_postgres_retried_batch_is_not_counted_twice(prefix: str) -> None:
    backend = PostgresBackend(URL, prefix)
    rows = [row_from(record(request_id=f"r{i}")) for i in range(3)]
    conn = backend.connect()
    try:
        backend.create_schema(conn)
        backend.insert(conn, rows)
        backend.insert(conn, rows)  # the retry of a batch whose acknowledgement was lost
    finally:
        conn.close()
    assert backend.count() == 3


def test_postgres_errors_truncation_and_export_pages(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQL both backends share, on PostgreSQL: a failed stream is an error and a client
    leaving is not; a grouped answer past the limit says so and keeps the latest groups; the
    export's cursor pages through rows that share a time."""
    from gateway.ledger import backend as backend_module
    from gateway.ledger import query

    backend = PostgresBackend(URL, prefix)
    t0 = 1_767_225_600.0
    rows = [row_from(record(request_id=f"r{i}", ts=t0 + min(i, 3) + (i // 4) * DAY))
            for i in range(6)]  # fmt: skip
    rows += [
        row_from(record(request_id="cut", ts=t0 + 9, stream=True, error_type="upstream_error")),
        row_from(record(request_id="left", ts=t0 + 9, status=499, client_disconnected=True)),
    ]
    conn = backend.connect()
    try:
        backend.create_schema(conn)
        backend.insert(conn, rows)
    finally:
        conn.close()
    flt = Filter(t0, t0 + 2 * DAY)
    assert backend.grouped(flt, ())[0]["errors"] == 1
    monkeypatch.setattr(backend_module, "GROUP_LIMIT", 1)
    days = query.usage_by_day_model(backend, flt)
    assert days.truncated and [d["day"] for d in days] == ["2026-01-02"]
    monkeypatch.setattr(backend_module, "ROW_LIMIT", 3)
    seen: list[str] = []
    after = None
    for _ in range(5):
        page, after = backend.rows(flt, after)
        seen += [r[0] for r in page]
        if after is None:
            break
    assert sorted(seen) == sorted(["cut", "left", *(f"r{i}" for i in range(6))])


def test_postgres_schema_check_does_not_wait_behind_an_open_write(prefix: str) -> None:
    """A session that died mid-insert behind a cut network keeps its lock until TCP keepalive
    ends it (hours). Reconnecting must not wait for it: the indexes already there are not
    created again (even "IF NOT EXISTS" waits for the lock), and inserts still go through."""
    import psycopg

    backend = PostgresBackend(URL, prefix, lock_timeout_s=0.5)
    conn = backend.connect()
    backend.create_schema(conn)
    backend.insert(conn, [row_from(record(request_id="a"))])
    holder = psycopg.connect(URL)  # a write left open: it holds the table's write lock
    try:
        holder.execute(f"UPDATE {backend.table} SET model = model WHERE request_id = 'a'")
        again = backend.connect()
        started = time.monotonic()
        backend.create_schema(again)
        backend.insert(again, [row_from(record(request_id="b"))])
        assert time.monotonic() - started < 0.5
        again.close()
    finally:
        holder.rollback()
        holder.close()
        conn.close()
    assert backend.count() == 2


def test_postgres_statement_behind_a_held_lock_fails_instead_of_hanging(prefix: str) -> None:
    import psycopg

    backend = PostgresBackend(URL, prefix, lock_timeout_s=0.3)
    conn = backend.connect()
    backend.create_schema(conn)
    holder = psycopg.connect(URL)
    # Without the lock timeout the insert would wait forever: end the holder's session after
    # a while, so that the test fails (the insert then succeeds) instead of hanging.
    watchdog = threading.Timer(5, holder.close)
    try:
        holder.execute(f"LOCK TABLE {backend.table} IN ACCESS EXCLUSIVE MODE")
        watchdog.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            backend.insert(conn, [row_from(record(request_id="c"))])
        assert time.monotonic() - started < 3
    finally:
        watchdog.cancel()
        if not holder.closed:
            holder.rollback()
            holder.close()
        conn.close()
