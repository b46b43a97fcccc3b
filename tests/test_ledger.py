"""The usage ledger: rows from log records, the SQLite backend, the batching writer (batches,
bounded buffer, retry and catch-up, flush on close), queries and config validation."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, LedgerConfig, parse_settings
from gateway.errors import InvalidRequestError
from gateway.ledger import Filter, Ledger, make_backend, query
from gateway.ledger import metrics as lm
from gateway.ledger.backend import Backend
from gateway.ledger.row import COLUMNS, as_dict, row_from
from gateway.ledger.sqlite import SqliteBackend
from gateway.ledger.writer import LedgerWriter

DAY = 86_400
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def record(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": T0 + 60, "request_id": "r1", "endpoint": "chat", "status": 200, "model": "alias",
        "model_name": "demo", "model_used": "demo-upstream", "provider": "openai",
        "deployment": "demo/0", "attempts": 1, "stream": False, "ms_total": 12.5,
        "ms_upstream": 10.0, "user": "alice", "tenant": "acme", "key_id": "k1",
        "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.00002,
    }  # fmt: skip
    base.update(over)
    return base


def metric(counter: Any, *labels: str) -> float:
    target = counter.labels(*labels) if labels else counter
    return float(target._value.get())


def test_row_from_record_maps_every_column() -> None:
    row = as_dict(row_from(record(blocked=True, tokens_estimated=True, ms_ttft=3.0)))
    assert set(row) == set(COLUMNS)
    assert row["day"] == "2026-01-01"
    assert row["model"] == "demo" and row["model_requested"] == "alias"
    assert row["user_id"] == "alice" and row["blocked"] == 1 and row["tokens_estimated"] == 1
    assert row["ms_ttft"] == 3.0 and row["limited"] == 0


def test_row_without_usage_or_known_model() -> None:
    row = as_dict(row_from({"ts": T0, "request_id": "x", "endpoint": "chat", "status": 404,
                            "model": "nope"}))  # fmt: skip
    assert row["model"] == "unknown" and row["prompt_tokens"] == 0 and row["cost_usd"] == 0.0
    assert row["user_id"] is None and row["ms_ttft"] is None


def sqlite_backend(tmp_path: Path) -> SqliteBackend:
    b = SqliteBackend(f"sqlite:///{tmp_path}/sub/usage.db", "t_")
    conn = b.connect()
    b.create_schema(conn)
    return b


def insert(b: Backend, rows: list[dict[str, Any]]) -> None:
    conn = b.connect()
    try:
        b.insert(conn, [row_from(r) for r in rows])
    finally:
        conn.close()


def test_retried_batch_is_not_counted_twice(tmp_path: Path) -> None:
    """A batch whose commit landed but whose acknowledgement was lost is retried as is: the
    second insert adds nothing. Two requests that share a client-chosen request id are still
    two rows."""
    b = sqlite_backend(tmp_path)
    rows = [row_from(record(request_id="same")), row_from(record(request_id="same"))]
    conn = b.connect()
    try:
        b.insert(conn, rows)
        b.insert(conn, rows)  # the retry
    finally:
        conn.close()
    assert b.count() == 2


def old_table(tmp_path: Path, columns: tuple[str, ...]) -> SqliteBackend:
    """A ledger table made with only ``columns``, holding one row ("old")."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE t_usage ({', '.join(columns)})")
    conn.execute(f"INSERT INTO t_usage VALUES ({', '.join('?' * len(columns))})",
                 row_from(record(request_id="old"))[: len(columns)])  # fmt: skip
    conn.commit()
    conn.close()
    return SqliteBackend(f"sqlite:///{path}", "t_")


def test_table_from_before_row_id_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    b = old_table(tmp_path, COLUMNS)
    for _ in range(2):  # idempotent: a second start changes nothing
        conn = b.connect()
        b.create_schema(conn)
        conn.close()
    insert(b, [record(request_id="new")])
    got = dict(b.query("SELECT request_id, row_id FROM t_usage", []))
    assert set(got) == {"old", "new"}
    assert got["old"] is None and len(got["new"]) == 32


def test_cache_token_columns_are_added_to_an_older_table_and_summed(tmp_path: Path) -> None:
    """The ledger kept each request's cost (cached tokens priced apart) but not how many of
    its prompt tokens the provider's cache served or wrote: the usage API could not show
    what caching saved. A table made before those columns gets them (old rows: NULL, summed
    as 0)."""
    b = old_table(tmp_path, COLUMNS[: COLUMNS.index("cached_tokens")])
    conn = b.connect()
    b.create_schema(conn)
    conn.close()
    insert(b, [record(request_id="a", prompt_tokens=1000, cached_tokens=900),
               record(request_id="b", prompt_tokens=1000, cached_tokens=600,
                      cache_write_tokens=400)])  # fmt: skip
    (total,) = b.grouped(Filter(T0, T0 + DAY), ())
    assert total["requests"] == 3 and total["prompt_tokens"] == 2010
    assert (total["cached_tokens"], total["cache_write_tokens"]) == (1500, 400)
    page, _ = b.rows(Filter(T0, T0 + DAY))
    got = {as_dict(r)["request_id"]: as_dict(r)["cached_tokens"] for r in page}
    assert got == {"old": None, "a": 900, "b": 600}


def test_sqlite_grouped_sums_and_filters(tmp_path: Path) -> None:
    b = sqlite_backend(tmp_path)
    assert (tmp_path / "sub" / "usage.db").exists()  # parent directory created
    insert(b, [
        record(),
        record(request_id="r2", ts=T0 + 120, user="bob", cost_usd=0.5, prompt_tokens=100),
        record(request_id="r3", ts=T0 + DAY + 5, model_name="big", status=429, limited=True,
               prompt_tokens=0, completion_tokens=0, cost_usd=0),
        record(request_id="r4", ts=T0 + DAY + 9, tenant="other", status=400, blocked=True),
    ])  # fmt: skip
    everything = Filter(T0, T0 + 2 * DAY)
    by = {(r["day"], r["model"]): r for r in b.grouped(everything, ("day", "model"))}
    assert by[("2026-01-01", "demo")]["requests"] == 2
    assert by[("2026-01-01", "demo")]["prompt_tokens"] == 110
    assert by[("2026-01-01", "demo")]["cost_usd"] == pytest.approx(0.50002)
    assert by[("2026-01-02", "big")]["limited"] == 1 and by[("2026-01-02", "big")]["errors"] == 1
    assert by[("2026-01-02", "demo")]["blocked"] == 1
    acme = b.grouped(Filter(T0, T0 + 2 * DAY, tenant="acme"), ())
    assert acme[0]["requests"] == 3
    bob = b.grouped(Filter(T0, T0 + 2 * DAY, user="bob"), ())
    assert bob[0]["requests"] == 1 and bob[0]["cost_usd"] == pytest.approx(0.5)
    # the range is half-open: ts == end is excluded
    assert b.grouped(Filter(T0, T0 + 120), ())[0]["requests"] == 1
    hours = b.grouped(everything, ("bucket",), bucket_s=3600)
    assert [h["bucket"] for h in hours] == [T0, T0 + DAY]
    assert b.count() == 4
    assert [r[0] for r in b.rows(everything)[0]] == ["r1", "r2", "r3", "r4"]


def test_summary_totals_rates_and_percentiles(tmp_path: Path) -> None:
    b = sqlite_backend(tmp_path)
    rows = [record(request_id=f"r{i}", ms_total=float(i), user=f"u{i % 3}",
                   cost_usd=0.001 * i) for i in range(1, 101)]  # fmt: skip
    rows.append(record(request_id="bad", status=400, blocked=True, ms_total=9999.0))
    insert(b, rows)
    s = query.summary(b, Filter(T0, T0 + DAY), 3600)
    t = s["totals"]
    assert t["requests"] == 101 and t["errors"] == 1 and t["blocked"] == 1
    assert t["block_rate"] == pytest.approx(1 / 101, abs=1e-6)
    # errors are left out of the latency percentiles
    assert s["latency_ms"]["p50"] == 50.0 and s["latency_ms"]["p99"] == 99.0
    assert s["latency_ms"]["sample"] == 100
    assert s["by_user"][0]["user"] in {"u0", "u1", "u2"}
    costs = [u["cost_usd"] for u in s["by_user"]]
    assert costs == sorted(costs, reverse=True)
    assert len(s["series"]) == 1 and s["series"][0]["requests"] == 101


def test_failed_streams_are_errors_and_a_client_leaving_is_not(tmp_path: Path) -> None:
    """A stream fails after its 200 went out: ``error_type`` says so, and it counts as an error
    (and not in the latency percentiles). A client that left (499 before the answer, or a
    stream it abandoned) is no error of the gateway's."""
    b = sqlite_backend(tmp_path)
    insert(b, [
        record(request_id="ok", stream=True, ms_total=1.0),
        record(request_id="cut", stream=True, error_type="upstream_error", ms_total=500.0),
        record(request_id="stall", stream=True, error_type="timeout", ms_total=600.0),
        record(request_id="left", stream=True, client_disconnected=True, ms_total=2.0),
        record(request_id="gone", status=499, client_disconnected=True, ms_total=3.0),
        record(request_id="bad", status=502, error_type="upstream_error", ms_total=4.0),
    ])  # fmt: skip
    t = query.summary(b, Filter(T0, T0 + DAY), 3600)["totals"]
    assert t["requests"] == 6 and t["errors"] == 3
    assert t["error_rate"] == pytest.approx(0.5)
    assert query.usage_by_day_model(b, Filter(T0, T0 + DAY))[0]["errors"] == 3
    assert query.summary(b, Filter(T0, T0 + DAY), 3600)["latency_ms"]["p99"] == 2.0


def test_grouped_answers_past_the_limit_say_so_and_keep_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.ledger import backend

    b = sqlite_backend(tmp_path)
    insert(b, [record(request_id=f"d{i}", ts=T0 + i * DAY + 5, model_name=m)
               for i in range(5) for m in ("demo", "big")])  # fmt: skip
    flt = Filter(T0, T0 + 5 * DAY)
    whole = query.usage_by_day_model(b, flt)
    assert len(whole) == 10 and not whole.truncated
    monkeypatch.setattr(backend, "GROUP_LIMIT", 3)
    cut = query.usage_by_day_model(b, flt)
    assert cut.truncated
    assert [(x["day"], x["model"]) for x in cut] == [
        ("2026-01-04", "demo"), ("2026-01-05", "big"), ("2026-01-05", "demo")]  # fmt: skip
    s = query.summary(b, flt, DAY)
    assert s["truncated"] and [x["bucket"] for x in s["series"]] == [
        T0 + i * DAY for i in (2, 3, 4)
    ]
    assert s["series_by_model"][-1]["bucket"] == T0 + 4 * DAY
    # An explicit hourly series that one answer cannot hold is refused, not cut.
    with pytest.raises(InvalidRequestError, match="bucket=day or a shorter range"):
        query.summary(b, flt, 3600, refuse_over_limit=True)
    monkeypatch.setattr(backend, "GROUP_LIMIT", 10)
    assert not query.summary(b, flt, DAY)["truncated"]


def test_rows_page_through_everything_with_a_cursor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.ledger import backend

    b = sqlite_backend(tmp_path)
    # Two rows share a time: the cursor still tells them apart (by row id).
    insert(b, [record(request_id=f"p{i}", ts=T0 + min(i, 3)) for i in range(6)])
    monkeypatch.setattr(backend, "ROW_LIMIT", 2)
    seen: list[str] = []
    after = None
    for _ in range(5):
        rows, after = b.rows(Filter(T0, T0 + DAY), after)
        seen += [r[0] for r in rows]
        assert len(rows) <= 2
        if after is None:
            break
    assert sorted(seen) == [f"p{i}" for i in range(6)] and len(seen) == 6
    assert seen[:3] == ["p0", "p1", "p2"]


def test_percentile_nearest_rank() -> None:
    assert query.percentile([], 50) is None
    assert query.percentile([5.0], 99) == 5.0
    assert query.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert query.percentile([1.0, 2.0, 3.0, 4.0], 90) == 4.0


class FlakyBackend(Backend):
    """An in-memory backend whose writes fail while ``down`` is set."""

    kind = "test"

    def __init__(self) -> None:
        super().__init__("t_")
        self.down = False
        self.batches: list[int] = []
        self.rows: list[Any] = []  # type: ignore[assignment]
        self.lock = threading.Lock()

    def describe(self) -> str:
        return "memory"

    def connect(self) -> Any:
        if self.down:
            raise ConnectionError("database down")
        return self

    def create_schema(self, conn: Any) -> None:
        pass

    def insert(self, conn: Any, rows: list[Any]) -> None:
        if self.down:
            raise ConnectionError("database down")
        with self.lock:
            self.batches.append(len(rows))
            self.rows.extend(rows)

    def close(self) -> None:
        pass


def wait_for(cond: Any, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def test_writer_batches_and_flushes_on_close() -> None:
    b = FlakyBackend()
    w = LedgerWriter(b, batch_size=50, flush_interval_s=30, max_buffer=1000)
    w.start()
    for i in range(120):
        w.submit(row_from(record(request_id=str(i))))
    # a full batch wakes the writer at once, long before the 30 s interval. (Only the first batch
    # is certain: the writer may drain while rows still arrive, and then the rest stays under a
    # batch until the interval or close.)
    wait_for(lambda: len(b.rows) >= 50)
    assert all(n <= 50 for n in b.batches)
    w.close(timeout=5)
    assert [r[0] for r in b.rows] == [str(i) for i in range(120)]  # nothing lost, in order
    assert w.pending == 0


def test_writer_buffers_while_down_then_catches_up() -> None:
    b = FlakyBackend()
    b.down = True
    errors = metric(lm.LEDGER_ERRORS, "ConnectionError")
    w = LedgerWriter(b, batch_size=10, flush_interval_s=0.02, max_buffer=1000)
    w.start()
    for i in range(25):
        w.submit(row_from(record(request_id=str(i))))
    wait_for(lambda: metric(lm.LEDGER_ERRORS, "ConnectionError") > errors)
    assert b.rows == [] and w.pending == 25
    b.down = False
    assert w.wait_settled(10)
    assert [r[0] for r in b.rows] == [str(i) for i in range(25)]
    w.close(timeout=1)


def test_writer_drops_beyond_max_buffer_and_counts_them() -> None:
    b = FlakyBackend()
    b.down = True
    full = metric(lm.LEDGER_DROPPED, "buffer_full")
    at_shutdown = metric(lm.LEDGER_DROPPED, "shutdown")
    w = LedgerWriter(b, batch_size=5, flush_interval_s=0.02, max_buffer=8)
    w.start()
    for i in range(12):
        w.submit(row_from(record(request_id=str(i))))
    assert metric(lm.LEDGER_DROPPED, "buffer_full") - full == 4
    w.close(timeout=0.2)  # still down: what is left is lost, and counted
    assert metric(lm.LEDGER_DROPPED, "shutdown") - at_shutdown == 8
    assert w.pending == 0


@pytest.mark.anyio
async def test_ledger_observe_settle_and_query(tmp_path: Path) -> None:
    cfg = LedgerConfig(url=f"sqlite:///{tmp_path}/u.db", flush_interval_s=10)
    ledger = Ledger(cfg)
    await ledger.start()
    try:
        for i in range(3):
            ledger.observe(None, record(request_id=f"q{i}", ts=time.time()))  # type: ignore[arg-type]
        # settle() makes the API read its own writes without waiting for the 10 s interval
        now = time.time()
        data = await ledger.usage(Filter(now - DAY, now + DAY))
        assert [(d["model"], d["requests"]) for d in data] == [("demo", 3)]
    finally:
        await ledger.close()
    db = sqlite3.connect(tmp_path / "u.db")
    assert db.execute("SELECT count(*) FROM gateway_usage").fetchone()[0] == 3
    db.close()


@pytest.mark.anyio
async def test_unwritable_sqlite_path_fails_at_startup(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ledger = Ledger(LedgerConfig(url=f"sqlite:///{blocker}/usage.db"))
    with pytest.raises(RuntimeError, match="ledger: cannot open sqlite:"):
        await ledger.start()


def test_config_validation() -> None:
    models = [{"name": "m", "deployments": [{"model": "x", "base_url": "http://127.0.0.1:1"}]}]
    s = parse_settings({"models": models})
    assert s.ledger.url == "none" and s.tracing.enabled is False  # off unless configured
    with pytest.raises(ConfigError) as e:
        parse_settings({"models": models, "ledger": {"url": "mysql://x"}})
    assert "ledger.url: must be none, sqlite:///path/to/usage.db or postgresql://" in str(e.value)
    with pytest.raises(ConfigError, match=r"ledger: unknown key 'batch'; allowed keys: "):
        parse_settings({"models": models, "ledger": {"batch": 3}})
    with pytest.raises(ConfigError, match=r"ledger.table_prefix: String should match pattern"):
        parse_settings({"models": models, "ledger": {"table_prefix": "x; DROP TABLE"}})
    with pytest.raises(ConfigError, match=r"tracing.exporter: Input should be 'otlp', 'console'"):
        parse_settings({"models": models, "tracing": {"exporter": "zipkin"}})


def test_make_backend_by_scheme() -> None:
    assert make_backend("sqlite:///x.db", "p_").kind == "sqlite"
    pg = make_backend("postgresql://user:secret@db.internal:5433/usage", "p_")
    assert pg.kind == "postgres"
    assert pg.describe() == "postgresql://db.internal:5433/usage"  # no credentials
