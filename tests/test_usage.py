"""``GET /v1/usage`` (own usage; admins any tenant or user; CSV) and ``/admin/usage/*`` through
the real gateway, with the ledger on SQLite."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.usage import days_ago
from tests.helpers import running_gateway
from tests.plugins.test_auth_support import ADMIN_KEY, USER_KEY, base_config, key_entry

BOB_KEY = "sk-test-BobKeyEeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}]}


def auth_config() -> dict[str, Any]:
    cfg = base_config()
    cfg["keys"].append(key_entry(BOB_KEY, "bob", user="bob", tenant="globex"))
    return cfg


def ledger_gateway(tmp_path: Path, **extra: Any) -> Any:
    return running_gateway(
        pipeline=[{"name": "auth", "config": auth_config()}],
        ledger={"url": f"sqlite:///{tmp_path}/usage.db", "flush_interval_s": 0.05},
        **extra,
    )


def get(gw: Any, path: str, key: str | None, **params: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{gw.url}{path}", params=params, headers=headers, timeout=20)


def chat(gw: Any, key: str, n: int = 1) -> None:
    for _ in range(n):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                       headers={"authorization": f"Bearer {key}"}, timeout=20)  # fmt: skip
        assert r.status_code == 200, r.text


def test_usage_is_own_for_users_and_any_for_admins(tmp_path: Path) -> None:
    with ledger_gateway(tmp_path) as gw:
        chat(gw, USER_KEY, 2)
        chat(gw, BOB_KEY, 1)
        mine = get(gw, "/v1/usage", USER_KEY)
        assert mine.status_code == 200, mine.text
        body = mine.json()
        assert body["user"] == "user1-user" and body["tenant"] == "acme"
        assert [(d["model"], d["requests"]) for d in body["data"]] == [("demo", 2)]
        assert body["data"][0]["prompt_tokens"] > 0 and body["data"][0]["cost_usd"] > 0
        # asking for someone else's usage is refused, not silently narrowed
        assert get(gw, "/v1/usage", USER_KEY, tenant="globex").status_code == 403
        assert get(gw, "/v1/usage", USER_KEY, user="bob").status_code == 403
        assert get(gw, "/v1/usage", USER_KEY, user="user1-user").status_code == 200
        # admins: any tenant or user, or everything
        globex = get(gw, "/v1/usage", ADMIN_KEY, tenant="globex").json()["data"]
        assert [(d["model"], d["requests"]) for d in globex] == [("demo", 1)]
        everyone = get(gw, "/v1/usage", ADMIN_KEY).json()["data"]
        assert sum(d["requests"] for d in everyone) == 3
        # the usage calls themselves are not billed requests
        assert sum(d["requests"] for d in get(gw, "/v1/usage", ADMIN_KEY).json()["data"]) == 3


def test_usage_csv_export(tmp_path: Path) -> None:
    with ledger_gateway(tmp_path) as gw:
        chat(gw, USER_KEY, 2)
        chat(gw, BOB_KEY, 1)
        r = get(gw, "/v1/usage", ADMIN_KEY, format="csv")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert len(rows) == 1 and rows[0]["model"] == "demo" and rows[0]["requests"] == "3"
        raw = get(gw, "/admin/usage/export", ADMIN_KEY)
        assert raw.status_code == 200
        lines = list(csv.DictReader(io.StringIO(raw.text)))
        assert len(lines) == 3
        assert {x["user_id"] for x in lines} == {"user1-user", "bob"}
        assert get(gw, "/admin/usage/export", USER_KEY).status_code == 403


def test_csv_neutralises_formulas(tmp_path: Path) -> None:
    evil = "sk-test-EvilKeyFfffffffffffffffffffffffffffffffffffff"
    cfg = auth_config()
    cfg["keys"].append(key_entry(evil, "evil", user="=HYPERLINK(1)", tenant="acme"))
    with running_gateway(
        pipeline=[{"name": "auth", "config": cfg}],
        ledger={"url": f"sqlite:///{tmp_path}/usage.db", "flush_interval_s": 0.05},
    ) as gw:
        chat(gw, evil)
        raw = get(gw, "/admin/usage/export", ADMIN_KEY).text
        assert "'=HYPERLINK(1)" in raw and ",=HYPERLINK" not in raw


def test_summary_and_errors(tmp_path: Path) -> None:
    with ledger_gateway(tmp_path) as gw:
        chat(gw, USER_KEY, 1)
        s = get(gw, "/admin/usage/summary", ADMIN_KEY)
        assert s.status_code == 200 and s.headers["cache-control"] == "no-store"
        data = s.json()
        assert data["totals"]["requests"] == 1 and data["bucket"] == "day"  # 30 days by default
        assert data["by_user"][0]["user"] == "user1-user"
        today = get(gw, "/admin/usage/summary", ADMIN_KEY, start=days_ago(0)).json()
        assert today["bucket"] == "hour" and today["totals"]["requests"] == 1  # short range
        assert get(gw, "/admin/usage/summary", ADMIN_KEY, bucket="hour").json()["bucket"] == "hour"
        assert get(gw, "/admin/usage/summary", USER_KEY).status_code == 403
        assert get(gw, "/admin/usage/summary", None).status_code == 401
        assert get(gw, "/v1/usage", None).status_code == 401
        bad = get(gw, "/v1/usage", USER_KEY, start="yesterday")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "start"
        rev = get(gw, "/v1/usage", USER_KEY, start="2026-02-01", end="2026-01-01")
        assert rev.status_code == 400
        wide = get(gw, "/v1/usage", USER_KEY, start="2020-01-01", end="2026-01-01")
        assert wide.status_code == 400 and "400 days" in wide.json()["error"]["message"]
        assert get(gw, "/admin/usage/summary", ADMIN_KEY, bucket="week").status_code == 400
        # An epoch end is that instant (a 10-digit one is not a bare date: no day is added).
        r = get(gw, "/v1/usage", USER_KEY, start="1699900000", end="1700000000")
        assert r.status_code == 200 and r.json()["end"] == "2023-11-14T22:13:20Z", r.text
        # Times no calendar can print are the client's mistake: 400, not a 500 (year 10000).
        for path, key, times in [
            ("/v1/usage", USER_KEY, {"end": "9999-12-31"}),
            ("/v1/usage", USER_KEY, {"start": "99999999999990", "end": "99999999999999"}),
            ("/v1/usage", USER_KEY, {"start": "0001-01-01T00:00:00+14:00"}),
            ("/admin/usage/summary", ADMIN_KEY, {"end": "9999-12-31"}),
            ("/admin/usage/export", ADMIN_KEY, {"end": "9999-12-31"}),
        ]:
            r = get(gw, path, key, **times)
            assert r.status_code == 400, (path, times, r.text)
            assert r.json()["error"]["param"] in times
        # a date range in the past holds nothing
        old = get(gw, "/v1/usage", USER_KEY, start="2025-01-01", end="2025-01-31")
        assert old.status_code == 200 and old.json()["data"] == []


def _metric(gw: Any, sample: str) -> float:
    for line in get(gw, "/metrics", ADMIN_KEY).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_stream_that_fails_midway_is_an_error(tmp_path: Path) -> None:
    """Its status is 200 (the answer had begun), its ``error_type`` says it failed: the usage
    API and the dashboard count it in ``errors``; the metrics count it by its status (200), and
    in ``gateway_failed_streams_total``."""
    failed = 'gateway_failed_streams_total{endpoint="chat",model="demo"}'
    ok = 'gateway_requests_total{endpoint="chat",model="demo",provider="openai",status="200"}'
    with ledger_gateway(tmp_path) as gw:
        before = _metric(gw, failed), _metric(gw, ok)
        chat(gw, USER_KEY, 1)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True},
                       headers={"authorization": f"Bearer {USER_KEY}", "x-fake-drop-after": "2"},
                       timeout=20)  # fmt: skip
        assert r.status_code == 200 and '"error"' in r.text
        day = get(gw, "/v1/usage", USER_KEY).json()["data"][0]
        assert (day["requests"], day["errors"], day["error_rate"]) == (2, 1, 0.5)
        totals = get(gw, "/admin/usage/summary", ADMIN_KEY).json()["totals"]
        assert totals["errors"] == 1
        assert (_metric(gw, failed) - before[0], _metric(gw, ok) - before[1]) == (1, 2)


def test_truncated_answers_say_so_and_the_export_pages_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.ledger import backend

    with ledger_gateway(tmp_path) as gw:
        chat(gw, USER_KEY, 3)
        monkeypatch.setattr(backend, "ROW_LIMIT", 2)
        first = get(gw, "/admin/usage/export", ADMIN_KEY)
        assert first.headers["x-truncated"] == "true"
        cursor = first.headers["x-next-after"]
        rest = get(gw, "/admin/usage/export", ADMIN_KEY, after=cursor)
        assert rest.status_code == 200 and "x-truncated" not in rest.headers
        ids = [r["request_id"] for r in csv.DictReader(io.StringIO(first.text + rest.text))
               if r["request_id"] != "request_id"]  # fmt: skip
        assert len(ids) == 3 and len(set(ids)) == 3
        for bad in ("x", "1e400:ab", "nan:ab", "1:a-b", "\uff11\uff17:ab"):
            r = get(gw, "/admin/usage/export", ADMIN_KEY, after=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "after", bad
        assert get(gw, "/v1/usage", USER_KEY).json()["truncated"] is False
        monkeypatch.setattr(backend, "GROUP_LIMIT", 0)
        assert get(gw, "/v1/usage", USER_KEY).json()["truncated"] is True
        assert get(gw, "/v1/usage", USER_KEY, format="csv").headers["x-truncated"] == "true"
        assert get(gw, "/admin/usage/summary", ADMIN_KEY).json()["truncated"] is True
        monkeypatch.setattr(backend, "GROUP_LIMIT", 100)
        hourly = get(gw, "/admin/usage/summary", ADMIN_KEY, bucket="hour")  # 30 days: 721 hours
        assert hourly.status_code == 400 and hourly.json()["error"]["param"] == "bucket"
        assert get(gw, "/admin/usage/summary", ADMIN_KEY, bucket="day").json()["truncated"] is False


def test_times_in_other_scripts_digits_are_refused(tmp_path: Path) -> None:
    with ledger_gateway(tmp_path) as gw:
        for times, param in [
            ({"end": "\uff12\uff10\uff12\uff16"}, "end"),  # fullwidth: was second 2026
            ({"start": "\u0661\u0667" + "\u0660" * 8, "end": "2026-01-01"}, "start"),
            ({"end": "2026-01-0\uff11"}, "end"),
            ({"end": "2026"}, "start"),  # epoch second 2026: 30 days before it is before 1970
        ]:
            r = get(gw, "/v1/usage", USER_KEY, **times)
            assert r.status_code == 400, (times, r.text)
            assert r.json()["error"]["param"] == param, times
        assert get(gw, "/v1/usage", USER_KEY, start="0", end="2026").status_code == 200


def test_ledger_off_and_no_auth(tmp_path: Path) -> None:
    with running_gateway(pipeline=[{"name": "auth", "config": auth_config()}]) as gw:
        r = get(gw, "/v1/usage", USER_KEY)
        assert r.status_code == 404 and "ledger" in r.json()["error"]["message"]
    with running_gateway(ledger={"url": f"sqlite:///{tmp_path}/u.db"}) as gw:
        # without an auth plugin nobody can be told apart: refused
        assert get(gw, "/v1/usage", None).status_code == 401
        assert get(gw, "/admin/dashboard", None).status_code == 401


def test_csv_cells_that_a_spreadsheet_would_read_as_formulas_are_quoted() -> None:
    from gateway.usage import _cell

    for value in ("=1+1", "+1", "-1", "@SUM(A1)", " =1+1", "\n=1+1", "  \n +cmd"):
        assert _cell(value) == "'" + value, value
    for value in ("demo", "gpt-4o", " a = b", 5, None):
        assert _cell(value) == value
