"""The plugin contract through the real app: order, short-circuit, reverse response phase."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from starlette.responses import JSONResponse

from gateway.config import ConfigError, parse_settings
from gateway.errors import PermissionDeniedError
from gateway.pipeline import build_pipeline
from gateway.plugin import Plugin, PluginConfig
from tests.helpers import running_gateway

EVENTS: list[str] = []


class ProbeConfig(PluginConfig):
    tag: str
    answer: bool = False
    deny: bool = False
    suffix: str = ""


class Probe(Plugin):
    """Records every hook call in EVENTS; can answer, deny or rewrite streamed chunks."""

    name = "probe"
    Config = ProbeConfig
    config: ProbeConfig

    async def on_request(self, ctx: Any) -> Any:
        EVENTS.append(f"req:{self.config.tag}")
        if self.config.deny:
            raise PermissionDeniedError("denied by probe")
        if self.config.answer:
            return JSONResponse({"answered_by": self.config.tag})
        return None

    async def on_chunk(self, ctx: Any, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if self.config.suffix:
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    delta["content"] += self.config.suffix
        EVENTS.append(f"chunk:{self.config.tag}")
        return [chunk]

    async def on_response(self, ctx: Any) -> None:
        EVENTS.append(f"resp:{self.config.tag}:{ctx.status}")


REGISTRY: dict[str, Any] = {"probe": Probe}


def probes(*configs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "probe", "config": c} for c in configs]


@pytest.fixture(autouse=True)
def _clear() -> None:
    EVENTS.clear()


def test_plugins_run_in_yaml_order_and_respond_in_reverse() -> None:
    with running_gateway(registry=REGISTRY, pipeline=probes({"tag": "a"}, {"tag": "b"},
                                                             {"tag": "c"})) as gw:  # fmt: skip
        r = gw.openai().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}]
        )
        assert r.choices[0].message.content == "Echo: hi"
    assert EVENTS == ["req:a", "req:b", "req:c", "resp:c:200", "resp:b:200", "resp:a:200"]


def test_answering_plugin_short_circuits_and_upstream_is_never_called() -> None:
    pipeline = probes({"tag": "a"}, {"tag": "cache", "answer": True}, {"tag": "never"})
    with running_gateway(registry=REGISTRY, pipeline=pipeline) as gw:
        r = gw.http().post(
            "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
        assert r.json() == {"answered_by": "cache"}
        assert r.headers["x-request-id"]
        assert gw.upstream_requests() == []
    assert "req:never" not in EVENTS
    assert EVENTS == ["req:a", "req:cache", "resp:cache:200", "resp:a:200"]


def test_denying_plugin_stops_pipeline_and_earlier_plugins_see_the_error() -> None:
    import openai

    pipeline = probes({"tag": "a"}, {"tag": "deny", "deny": True}, {"tag": "never"})
    with running_gateway(registry=REGISTRY, pipeline=pipeline) as gw:
        with pytest.raises(openai.PermissionDeniedError) as exc:
            gw.openai().chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}]
            )
        assert exc.value.status_code == 403
        assert exc.value.body["code"] == "permission_denied"  # type: ignore[index]
        assert gw.upstream_requests() == []
    assert EVENTS == ["req:a", "req:deny", "resp:deny:403", "resp:a:403"]


def test_chunk_hooks_run_in_reverse_order_on_every_streamed_chunk() -> None:
    pipeline = probes({"tag": "outer", "suffix": "1"}, {"tag": "inner", "suffix": "2"})
    with running_gateway(registry=REGISTRY, pipeline=pipeline, fake={"chunks": 2}) as gw:
        stream = gw.openai().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "abcd"}], stream=True
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
    contents = [p for p in pieces if p]
    # inner (closer to the upstream) sees the chunk first, so its suffix comes first
    assert contents and all(p.endswith("21") for p in contents)
    chunk_events = [e for e in EVENTS if e.startswith("chunk:")]
    # A relay block goes through inner, then outer (on_chunks): each chunk reaches inner first.
    inner = [i for i, e in enumerate(chunk_events) if e == "chunk:inner"]
    outer = [i for i, e in enumerate(chunk_events) if e == "chunk:outer"]
    assert inner and len(inner) == len(outer)
    assert all(a < b for a, b in zip(inner, outer, strict=True))


def test_unknown_plugin_type_names_the_allowed_ones() -> None:
    settings = parse_settings(
        {"models": [{"name": "m", "deployments": [{"model": "x", "base_url": "http://h"}]}],
         "pipeline": [{"name": "nope"}]},
        "conf.yaml",
    )  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        build_pipeline(settings)
    msg = str(exc.value)
    assert "conf.yaml: pipeline[0].name: unknown plugin 'nope'" in msg
    assert "auth" in msg and "headers" in msg and "limit" in msg


def test_plugin_config_errors_name_the_key_path() -> None:
    settings = parse_settings(
        {"models": [{"name": "m", "deployments": [{"model": "x", "base_url": "http://h"}]}],
         "pipeline": [{"name": "headers", "config": {"respons": {}}}]},
        "conf.yaml",
    )  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        build_pipeline(settings)
    assert "conf.yaml: pipeline[0].config: unknown key 'respons'; allowed keys: response, " \
           "upstream" in str(exc.value)  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"name": "ratelimitt", "enabled": False}, "pipeline[0].name: unknown plugin"),
        ({"name": "limit", "enabled": False, "config": {"rpmm": 5}},
         "pipeline[0].config: unknown key 'rpmm'"),
    ],
)  # fmt: skip
def test_a_disabled_entry_is_validated_too(entry: dict[str, Any], where: str) -> None:
    """Its mistakes waited for the day someone enabled it."""
    settings = parse_settings(
        {"models": [{"name": "m", "deployments": [{"model": "x", "base_url": "http://h"}]}],
         "pipeline": [entry]},
        "conf.yaml",
    )  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        build_pipeline(settings)
    assert where in str(exc.value)
    ok = {**entry, "name": "headers", "config": {}}
    settings = parse_settings(
        {"models": [{"name": "m", "deployments": [{"model": "x", "base_url": "http://h"}]}],
         "pipeline": [ok]},
        "conf.yaml",
    )  # fmt: skip
    assert build_pipeline(settings) == []  # disabled: validated, not built


def test_headers_plugin_adds_response_and_upstream_headers() -> None:
    pipeline = [{"name": "headers", "config": {"response": {"x-team": "blue"},
                                                "upstream": {"x-route-tag": "t1"}}}]  # fmt: skip
    with running_gateway(pipeline=pipeline) as gw:
        r = gw.http().post(
            "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
        assert r.headers["x-team"] == "blue"
        sent = dict((k.lower(), v) for k, v in gw.upstream_requests()[-1]["headers"])
        assert sent["x-route-tag"] == "t1"


def test_headers_plugin_refuses_credentials() -> None:
    settings = parse_settings(
        {"models": [{"name": "m", "deployments": [{"model": "x", "base_url": "http://h"}]}],
         "pipeline": [{"name": "headers", "config": {"upstream": {"Authorization": "x"}}}]},
        "conf.yaml",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="may not be set here"):
        build_pipeline(settings)


class Lifecycle(Plugin):
    name = "life"
    calls: ClassVar[list[str]] = []

    async def startup(self, gateway: Any) -> None:
        self.calls.append("startup")

    async def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_startup_and_shutdown_run_in_the_lifespan() -> None:
    Lifecycle.calls.clear()
    with running_gateway(registry={"life": Lifecycle}, pipeline=[{"name": "life"}]) as gw:
        assert Lifecycle.calls == ["startup"]
        assert gw.http().get("/readyz").status_code == 200
    assert Lifecycle.calls == ["startup", "shutdown"]
