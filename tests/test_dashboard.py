"""The cost dashboard in a real headless browser (Debian's Chromium driven by Playwright): it
loads, shows the figures the ledger holds, and draws its charts as SVG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import ROOT, build_config, demo_model, running_gateway
from tests.plugins.test_auth_support import ADMIN_KEY, USER_KEY
from tests.test_usage import BOB_KEY, auth_config, chat

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
KPIS = ("requests", "cost", "tokens", "prompt-tokens", "completion-tokens", "cached-tokens",
        "errors", "blocked", "p50", "p90", "p99")  # fmt: skip


def read_dashboard(url: str, key: str) -> dict[str, Any]:
    """Load ``/admin/dashboard`` with ``key`` and return what the page shows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            context = browser.new_context(extra_http_headers={"authorization": f"Bearer {key}"})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            response = page.goto(f"{url}/admin/dashboard")
            assert response is not None
            out: dict[str, Any] = {"status": response.status, "errors": errors,
                                   "outside": outside}  # fmt: skip
            if response.status != 200:
                return out
            page.wait_for_selector("body[data-loaded]", timeout=15_000)
            out["loaded"] = page.get_attribute("body", "data-loaded")
            out["status_text"] = page.text_content("#status")
            out["status_class"] = page.get_attribute("#status", "class")
            out["kpi"] = {k: page.get_attribute(f"#kpi-{k}", "data-value") for k in KPIS}
            out["kpi_text"] = {k: page.text_content(f"#kpi-{k}") for k in KPIS}
            out["svg"] = page.locator("svg.chart").count()
            out["bars"] = {
                el.get_attribute("data-label"): float(el.get_attribute("data-value") or 0)
                for el in page.locator("#chart-models rect.bar").all()
            }
            out["tenant_bars"] = page.locator("#chart-tenants rect.bar").count()
            out["lines"] = page.locator("#chart-spend path.line").count()
            out["points"] = page.locator("svg.chart circle.point").count()
            out["users"] = [
                row.locator("td").first.text_content()
                for row in page.locator("#table-users tr").all()[1:]
            ]
            page.fill("#f-tenant", "globex")
            page.click("#apply")
            # Polled from here: the page's CSP forbids the eval wait_for_function would need.
            deadline = time.monotonic() + 15
            while page.get_attribute("#kpi-requests", "data-value") == out["kpi"]["requests"]:
                assert time.monotonic() < deadline, "the tenant filter did not re-query"
                page.wait_for_timeout(50)
            out["globex_requests"] = page.get_attribute("#kpi-requests", "data-value")
            return out
        finally:
            browser.close()


def big_model(url: str) -> dict[str, Any]:
    """A second, dearer model (the user role may use ``gpt-*``)."""
    return demo_model(url, "gpt-big", price={"input_per_mtok": 10.0, "output_per_mtok": 30.0})


def ledger_config(tmp_path: Path) -> Any:
    """Auth, a SQLite ledger and the two models, for ``running_gateway``."""

    def config(url: str) -> dict[str, Any]:
        cfg = build_config(url, pipeline=[{"name": "auth", "config": auth_config()}],
                           ledger={"url": f"sqlite:///{tmp_path}/usage.db"})  # fmt: skip
        cfg["models"].append(big_model(url))
        return cfg

    return config


def test_dashboard_shows_ledger_figures_and_draws_charts(tmp_path: Path) -> None:
    with running_gateway(ledger_config(tmp_path)) as gw:
        chat(gw, USER_KEY, 3)
        chat(gw, BOB_KEY, 2)
        r = httpx.post(
            f"{gw.url}/v1/chat/completions",
            timeout=20,
            headers={"authorization": f"Bearer {USER_KEY}"},
            json={"model": "gpt-big", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
        summary = httpx.get(f"{gw.url}/admin/usage/summary", timeout=20,
                            headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()  # fmt: skip
        shown = read_dashboard(gw.url, ADMIN_KEY)
        refused = read_dashboard(gw.url, USER_KEY)
    assert shown["status"] == 200 and shown["loaded"] == "true", shown
    assert shown["errors"] == [] and shown["outside"] == []  # no script error, no CDN
    t = summary["totals"]
    assert t["requests"] == 6
    assert int(shown["kpi"]["requests"]) == 6 and shown["kpi_text"]["requests"] == "6"
    assert float(shown["kpi"]["cost"]) == t["cost_usd"] > 0
    assert int(shown["kpi"]["tokens"]) == t["prompt_tokens"] + t["completion_tokens"]
    assert float(shown["kpi"]["p50"]) == summary["latency_ms"]["p50"]
    assert shown["svg"] >= 5  # spend, tokens, requests, models, tenants
    assert shown["bars"] == {m["model"]: m["cost_usd"] for m in summary["by_model"]}
    assert set(shown["bars"]) == {"demo", "gpt-big"}
    assert shown["tenant_bars"] == 2 and shown["lines"] == 3  # total + one per model
    assert shown["points"] > 0
    assert set(shown["users"]) == {"user1-user", "bob"}
    assert shown["globex_requests"] == "2"  # the tenant filter re-queries
    # a non-admin gets the 403 answer, not the page
    assert refused["status"] == 403 and "loaded" not in refused
    assert "partial" not in shown["status_text"] and shown["status_class"] != "partial"
    assert shown["kpi"]["cached-tokens"] == "0"


def test_dashboard_says_when_the_ledger_had_more_than_one_view_holds(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """``/admin/usage/summary`` says ``truncated`` when a grouped part passed the group limit
    (the series keep their latest buckets); the page drew the partial figures as if whole."""
    from gateway.ledger import backend

    with running_gateway(ledger_config(tmp_path)) as gw:
        chat(gw, USER_KEY, 1)
        chat(gw, BOB_KEY, 1)
        r = httpx.post(
            f"{gw.url}/v1/chat/completions", timeout=20,
            headers={"authorization": f"Bearer {USER_KEY}"},
            json={"model": "gpt-big", "messages": [{"role": "user", "content": "hi"}]},
        )  # fmt: skip
        assert r.status_code == 200
        monkeypatch.setattr(backend, "GROUP_LIMIT", 1)  # two models: one group too many
        shown = read_dashboard(gw.url, ADMIN_KEY)
    assert shown["loaded"] == "true" and shown["errors"] == []
    assert shown["status_class"] == "partial" and "partial" in shown["status_text"]


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    import importlib
    import json
    import re

    from prometheus_client import REGISTRY

    for module in ("gateway.metrics", "gateway.ledger.metrics", "plugins.limit.plugin",
                   "plugins.guard.scanner", "plugins.route.breaker"):  # fmt: skip
        importlib.import_module(module)
    dash = json.loads((ROOT / "deploy" / "grafana" / "gateway-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bgateway_[a-z_]+", e)}
    exported = set(REGISTRY._names_to_collectors)  # sample names: _total, _bucket, ...
    assert len(used) >= 15
    assert used <= exported, sorted(used - exported)
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
