"""An upstream's usage: counts read strictly (a malformed one is estimated, never taken as 0),
and prompt-cache tokens priced apart, in the request log, the ledger and the cost metric."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from gateway.catalogue import Price
from gateway.context import RequestContext, Usage, reported_usage, usage_from
from gateway.providers.anthropic_translate import usage_of
from gateway.stream import _Relay
from tests.helpers import build_config, running_gateway
from tests.test_observability_e2e import delta, scrape
from tests.test_stream_guard_blocks import event, guard

# --- reading an upstream's counts ---------------------------------------------------------------


def estimate() -> Usage:
    return Usage(11, 22, estimated=True)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 5}, Usage(10, 5)),
        # Whole floats are counts (some servers send them).
        ({"prompt_tokens": 1000.0, "completion_tokens": 2000.0}, Usage(1000, 2000)),
        ({"prompt_tokens": 1000, "completion_tokens": 2000.0}, Usage(1000, 2000)),
        # A count that is none: only it is estimated, and the usage says so.
        ({"prompt_tokens": 10, "completion_tokens": 2000.5}, Usage(10, 22, estimated=True)),
        ({"prompt_tokens": 10, "completion_tokens": True}, Usage(10, 22, estimated=True)),
        ({"prompt_tokens": False, "completion_tokens": 5}, Usage(11, 5, estimated=True)),
        ({"prompt_tokens": 10, "completion_tokens": -5}, Usage(10, 22, estimated=True)),
        ({"prompt_tokens": 10, "completion_tokens": "5"}, Usage(10, 22, estimated=True)),
        ({"prompt_tokens": 10, "completion_tokens": math.inf}, Usage(10, 22, estimated=True)),
        ({"prompt_tokens": math.nan, "completion_tokens": 5}, Usage(11, 5, estimated=True)),
        ({"prompt_tokens": 10**20, "completion_tokens": 5}, Usage(11, 5, estimated=True)),
        ({"completion_tokens": 5000}, Usage(11, 5000, estimated=True)),
        ({"prompt_tokens": 10}, Usage(10, 22, estimated=True)),
        # Cache counts, bounded by the prompt they are part of.
        ({"prompt_tokens": 1000, "completion_tokens": 5,
          "prompt_tokens_details": {"cached_tokens": 900.0}}, Usage(1000, 5, False, 900, 0)),
        ({"prompt_tokens": 1000, "completion_tokens": 5, "prompt_tokens_details": {
            "cached_tokens": 600, "cache_write_tokens": 600}}, Usage(1000, 5, False, 600, 400)),
        ({"prompt_tokens": 10, "completion_tokens": 5,
          "prompt_tokens_details": {"cached_tokens": True}}, Usage(10, 5)),
    ],
)  # fmt: skip
def test_usage_counts_are_whole_non_negative_numbers(
    usage: dict[str, Any], expected: Usage
) -> None:
    assert usage_from({"usage": usage}, estimate) == expected


def test_no_valid_count_is_no_usage_the_caller_estimates_it_all() -> None:
    for usage in (None, [], {}, {"prompt_tokens": "1", "completion_tokens": None}):
        assert usage_from({"usage": usage}, estimate) is None


def _ctx() -> RequestContext:
    body = {"messages": [{"role": "user", "content": "count these few words please"}]}
    return RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], body, stream=True)


ANSWER = "one two three four five six seven eight nine ten " * 5


@pytest.mark.anyio
@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("one_read", [False, True])
async def test_a_streamed_invalid_count_is_estimated_from_the_text(
    hooked: bool, one_read: bool
) -> None:
    """Fast path and parsed path, one read or one read per event: the valid count is kept,
    the invalid one estimated from what was generated (not 0, not the whole usage thrown)."""
    usage = {"prompt_tokens": 1234, "completion_tokens": 2000.5, "total_tokens": 3}
    data = (
        event({"role": "assistant", "content": ""}) + event({"content": ANSWER})
        + event({}, finish="stop")
        + b'data: {"id":"c1","choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"
        + b"data: [DONE]\n\n"
    )  # fmt: skip
    r = _Relay(_ctx(), [guard()] if hooked else [], False)
    if one_read:
        await r.feed(data)
    else:
        for ev in data.split(b"\n\n")[:-1]:
            await r.feed(ev + b"\n\n")
    await r.end()
    got = r.final_usage()
    assert got.prompt_tokens == 1234 and got.estimated
    assert 40 <= got.completion_tokens <= 60, got  # ~50 words

    # A valid usage after it wins.
    r = _Relay(_ctx(), [guard()] if hooked else [], False)
    good = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    await r.feed(data.replace(b"data: [DONE]\n\n", good + b"data: [DONE]\n\n"))
    await r.end()
    assert r.final_usage() == Usage(1, 2)


# --- prices ------------------------------------------------------------------------------------


def test_cache_prices_default_to_the_input_price() -> None:
    plain = Price(input_per_mtok=1.0, output_per_mtok=2.0)
    assert plain.cost(1000, 100, cached_tokens=900) == plain.cost(1000, 100) == pytest.approx(
        0.0012)  # fmt: skip
    priced = Price(input_per_mtok=1.0, output_per_mtok=2.0, cached_input_per_mtok=0.1,
                   cache_write_per_mtok=1.25)  # fmt: skip
    # 50 plain at $1, 900 cached at $0.1, 50 written at $1.25, 100 out at $2 (per million).
    assert priced.cost(1000, 100, 900, 50) == pytest.approx((50 + 90 + 62.5 + 200) / 1e6)
    assert priced.cost_of(Usage(1000, 100, False, 900, 50)) == priced.cost(1000, 100, 900, 50)
    assert priced.max_input_rate == 1.25
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Price(cached_input_per_mtok=-1)


# --- end to end: the log, the ledger and the cost metric ----------------------------------------

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "cached_input_per_mtok": 0.1,
         "cache_write_per_mtok": 1.25}  # fmt: skip


def _config(tmp_path: Path) -> Any:
    def config(url: str) -> dict[str, Any]:
        cfg = build_config(
            url,
            ledger={"url": f"sqlite:///{tmp_path / 'usage.db'}", "flush_interval_s": 0.05},
            logging={"request_log": str(tmp_path / "requests.jsonl")},
        )
        cfg["models"][0]["deployments"][0]["price"] = PRICE
        cfg["models"].append({"name": "claude", "deployments": [{
            "provider": "anthropic", "model": "claude-up", "base_url": f"{url}/v1",
            "api_key": "sk-ant-x", "price": PRICE}]})  # fmt: skip
        return cfg

    return config


def _chat(gw: Any, model: str, stream: bool, usage: dict[str, Any]) -> dict[str, Any]:
    """One request; the usage the client got."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = gw.http().post("/v1/chat/completions", json=body,
                       headers={"authorization": f"Bearer {gw.api_key}",
                                "x-fake-usage": json.dumps(usage)})  # fmt: skip
    assert r.status_code == 200, r.text
    if not stream:
        return dict(r.json()["usage"])
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    return dict(events[-1]["usage"])


def test_cached_tokens_are_priced_apart_everywhere(tmp_path: Path) -> None:
    openai_usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                    "prompt_tokens_details": {"cached_tokens": 900}}  # fmt: skip
    anthropic_usage = {"input_tokens": 100, "cache_read_input_tokens": 800,
                       "cache_creation_input_tokens": 100, "output_tokens": 100}  # fmt: skip
    # $ per million: 100 x 1 + 900 x 0.1 + 100 x 2; 100 x 1 + 800 x 0.1 + 100 x 1.25 + 100 x 2
    openai_cost, anthropic_cost = 390e-6, 505e-6
    with running_gateway(_config(tmp_path)) as gw:
        before = scrape(gw.url)
        seen = [_chat(gw, m, s, u) for m, u in (("demo", openai_usage),
                ("claude", anthropic_usage)) for s in (False, True)]  # fmt: skip
        after = scrape(gw.url)
    # The client sees OpenAI's shape: prompt_tokens counts the cached ones too.
    for got in seen[:2]:
        assert got["prompt_tokens"] == 1000 and got["completion_tokens"] == 100
        assert got["prompt_tokens_details"] == {"cached_tokens": 900}
    for got in seen[2:]:
        assert got["prompt_tokens"] == 1000 and got["total_tokens"] == 1100
        assert got["prompt_tokens_details"]["cached_tokens"] == 800
    lines = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [x["cost_usd"] for x in lines] == pytest.approx(
        [openai_cost, openai_cost, anthropic_cost, anthropic_cost])  # fmt: skip
    assert [(x["cached_tokens"], x["cache_write_tokens"]) for x in lines] == [
        (900, 0), (900, 0), (800, 100), (800, 100)]  # fmt: skip
    assert all(x["prompt_tokens"] == 1000 and "tokens_estimated" not in x for x in lines)
    conn = sqlite3.connect(tmp_path / "usage.db")
    costs = dict(conn.execute("SELECT request_id, cost_usd FROM gateway_usage").fetchall())
    conn.close()
    assert costs == {x["request_id"]: pytest.approx(x["cost_usd"]) for x in lines}
    assert delta(before, after, "gateway_cost_usd_total") == pytest.approx(
        2 * (openai_cost + anthropic_cost))  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_upstream_count_is_estimated_not_zero(tmp_path: Path, stream: bool) -> None:
    with running_gateway(_config(tmp_path)) as gw:
        _chat(gw, "demo", stream, {"prompt_tokens": 1000.0, "completion_tokens": 2000.0})
        _chat(gw, "demo", stream, {"prompt_tokens": 1000, "completion_tokens": True})
        _chat(gw, "claude", stream, {"input_tokens": 1000, "output_tokens": -4})
    lines = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    whole, boolean, negative = lines
    assert (whole["prompt_tokens"], whole["completion_tokens"]) == (1000, 2000)
    assert "tokens_estimated" not in whole
    assert whole["cost_usd"] == pytest.approx((1000 + 4000) / 1e6)
    for line in (boolean, negative):
        assert line["prompt_tokens"] == 1000 and line["tokens_estimated"] is True
        assert line["completion_tokens"] >= 1  # counted from the answer "Echo: hi"


def test_one_hour_cache_writes_are_priced_at_their_own_rate(tmp_path: Path) -> None:
    """Anthropic bills writes to its one-hour cache at 2x the input price, the five-minute
    ones at 1.25x; both came as ``cache_creation_input_tokens`` and were all priced at the
    five-minute rate (an hour's writes undercounted by 37.5%)."""
    price = PRICE | {"cache_write_1h_per_mtok": 2.0}
    usage = {"input_tokens": 100, "cache_read_input_tokens": 500,
             "cache_creation_input_tokens": 400, "output_tokens": 100,
             "cache_creation": {"ephemeral_5m_input_tokens": 100,
                                "ephemeral_1h_input_tokens": 300}}  # fmt: skip
    # $ per million: 100 x 1 + 500 x 0.1 + 100 x 1.25 + 300 x 2 + 100 x 2
    cost = 1075e-6

    def config(url: str) -> dict[str, Any]:
        cfg = _config(tmp_path)(url)
        cfg["models"][1]["deployments"][0]["price"] = price
        return cfg

    with running_gateway(config) as gw:
        before = scrape(gw.url)
        seen = [_chat(gw, "claude", s, usage) for s in (False, True)]
        after = scrape(gw.url)
    for got in seen:
        assert got["prompt_tokens"] == 1000
        assert got["prompt_tokens_details"] == {"cached_tokens": 500, "cache_write_tokens": 400,
                                                "cache_write_1h_tokens": 300}  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [x["cost_usd"] for x in lines] == pytest.approx([cost, cost])
    assert [x["cache_write_1h_tokens"] for x in lines] == [300, 300]
    assert delta(before, after, "gateway_cost_usd_total") == pytest.approx(2 * cost)


def test_one_hour_cache_price_defaults_and_bounds() -> None:
    # Unset, the hour's writes cost what the other writes cost (as before it existed).
    assert Price(input_per_mtok=1.0, cache_write_per_mtok=1.25).cost(1000, 0, 0, 400, 300) == (
        pytest.approx(600 * 1.0 / 1e6 + 400 * 1.25 / 1e6))  # fmt: skip
    priced = Price(input_per_mtok=1.0, cache_write_per_mtok=1.25, cache_write_1h_per_mtok=2.0)
    assert priced.max_input_rate == 2.0  # a budget's worst case counts the dearest token
    # A reported hour share larger than the writes is cut to them.
    details = {"cached_tokens": 0, "cache_write_tokens": 100, "cache_write_1h_tokens": 900}
    got = reported_usage({"usage": {"prompt_tokens": 1000, "completion_tokens": 1,
                                    "prompt_tokens_details": details}})  # fmt: skip
    assert got is not None and got.usage().cache_write_1h_tokens == 100
    assert usage_of({"input_tokens": 1, "cache_creation_input_tokens": 10, "output_tokens": 1,
                     "cache_creation": {"ephemeral_1h_input_tokens": 50}})[
        "prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 10,
                                     "cache_write_1h_tokens": 10}  # fmt: skip
