"""Roles: models (names, globs, aliases), endpoints, admin routes, and ``visible_models``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.catalogue import Catalogue, ModelEntry
from gateway.context import Identity
from gateway.errors import PermissionDeniedError
from tests.plugins.test_auth_support import ADMIN_KEY, USER_KEY, bearer, make_ctx, make_plugin


def ident(*roles: str) -> Identity:
    return Identity(user="u", roles=roles)


def catalogue() -> Catalogue:
    dep = [{"model": "m", "base_url": "http://127.0.0.1:1"}]
    return Catalogue(
        (
            ModelEntry.model_validate({"name": "demo", "deployments": dep}),
            ModelEntry.model_validate({"name": "gpt-4o", "deployments": dep}),
            ModelEntry.model_validate(
                {"name": "o1-pro", "aliases": ["gpt-pro"], "deployments": dep}
            ),
            ModelEntry.model_validate(
                {"name": "embed-small", "kind": "embeddings", "deployments": dep}
            ),
        )
    )


@pytest.mark.anyio
@pytest.mark.parametrize("model", ["demo", "gpt-4o", "gpt-4o-mini"])
async def test_user_may_use_listed_and_globbed_models(model: str) -> None:
    ctx = make_ctx(bearer(USER_KEY), model=model)
    await make_plugin().on_request(ctx)
    assert ctx.identity is not None


@pytest.mark.anyio
@pytest.mark.parametrize("model", ["o1-pro", "demo2", "xgpt-4o", "DEMO", "", "gpt"])
async def test_user_asking_for_a_model_it_may_not_use_gets_403(model: str) -> None:
    ctx = make_ctx(bearer(USER_KEY), model=model)
    with pytest.raises(PermissionDeniedError) as info:
        await make_plugin().on_request(ctx)
    assert info.value.status == 403
    assert info.value.param == "model"


@pytest.mark.anyio
async def test_admin_may_use_any_model_and_the_admin_routes() -> None:
    plugin = make_plugin()
    for endpoint, model in (("chat", "o1-pro"), ("admin", ""), ("metrics", ""), ("models", "")):
        ctx = make_ctx(bearer(ADMIN_KEY), endpoint=endpoint, model=model)
        await plugin.on_request(ctx)
        assert ctx.identity is not None and ctx.identity.roles == ("admin", "user")


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/admin/keys", "/admin/keys/abc", "/admin"])
async def test_user_on_admin_routes_gets_403(path: str) -> None:
    ctx = make_ctx(bearer(USER_KEY), endpoint="admin", path=path, model="")
    with pytest.raises(PermissionDeniedError) as info:
        await make_plugin().on_request(ctx)
    assert info.value.message == "this route requires an admin role"


@pytest.mark.anyio
async def test_endpoint_not_granted_gets_403() -> None:
    plugin = make_plugin(
        keys=[
            {
                "id": "e",
                "hash": make_plugin().table.digest(USER_KEY).hex(),
                "user": "u",
                "roles": ["embedder"],
            }
        ]
    )
    await plugin.on_request(make_ctx(bearer(USER_KEY), endpoint="embeddings", model="embed-small"))
    for endpoint in ("chat", "models", "metrics", "something-new"):
        with pytest.raises(PermissionDeniedError):
            await plugin.on_request(
                make_ctx(bearer(USER_KEY), endpoint=endpoint, model="embed-small")
            )


def test_star_endpoints_do_not_include_admin() -> None:
    plugin = make_plugin(
        roles={"power": {"models": ["*"], "endpoints": ["*"]}, "user": {}, "admin": {"admin": True}}
    )
    grant = plugin.rbac.grant(("power",))
    assert "admin" not in grant.endpoints
    assert {"chat", "embeddings", "models", "metrics"} <= grant.endpoints


def test_roles_are_additive_and_unknown_roles_grant_nothing() -> None:
    rbac = make_plugin().rbac
    assert rbac.model_allowed(ident("user", "embedder"), "embed-small")
    assert rbac.model_allowed(ident("user", "embedder"), "demo")
    assert not rbac.model_allowed(ident("root"), "demo")
    assert not rbac.model_allowed(ident(), "demo")


def test_an_alias_is_allowed_when_its_name_or_its_target_is_granted() -> None:
    plugin = make_plugin()
    plugin.rbac.catalogue = catalogue()
    # "gpt-pro" matches the user's gpt-* glob although it is an alias of o1-pro.
    assert plugin.rbac.model_allowed(ident("user"), "gpt-pro")
    assert not plugin.rbac.model_allowed(ident("user"), "o1-pro")


def test_visible_models_lists_only_permitted_models() -> None:
    plugin = make_plugin()
    names = catalogue().names()
    ctx = make_ctx(endpoint="models")
    ctx.identity = ident("user")
    assert plugin.visible_models(ctx, names) == ["demo", "gpt-4o"]
    ctx.identity = ident("embedder")
    assert plugin.visible_models(ctx, names) == ["embed-small"]
    ctx.identity = ident("admin")
    assert plugin.visible_models(ctx, names) == names
    ctx.identity = None
    assert plugin.visible_models(ctx, names) == []


@pytest.mark.anyio
async def test_startup_wires_the_catalogue() -> None:
    plugin = make_plugin()
    gw = SimpleNamespace(catalogue=catalogue(), session=None)
    await plugin.startup(gw)  # type: ignore[arg-type]
    try:
        assert plugin.rbac.catalogue is gw.catalogue
    finally:
        await plugin.shutdown()
