"""The key-digest memo of ``KeyTable``: it saves the HMAC for keys seen before, and must never
keep a key working after it is revoked, hold the raw key, or grow without bound."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.errors import AuthenticationError
from plugins.auth import keys
from plugins.auth.keys import KeyRecord, fingerprint, hash_key, mint_key
from tests.plugins.test_auth_support import SECRET, USER_KEY, bearer, make_ctx, make_plugin


class FakeStore:
    """The part of RedisKeyStore that ``lookup`` uses."""

    def __init__(self) -> None:
        self.records: dict[bytes, KeyRecord] = {}
        self.reads = 0

    async def get(self, digest: bytes) -> KeyRecord | None:
        self.reads += 1
        return self.records.get(digest)


@pytest.mark.anyio
async def test_a_known_key_skips_the_hmac_and_never_stores_the_raw_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin = make_plugin()
    await plugin.on_request(make_ctx(bearer(USER_KEY)))
    remembered = plugin.table._remembered
    assert list(remembered) == [fingerprint(USER_KEY)]
    assert all(USER_KEY.encode() not in k + v for k, v in remembered.items())

    def no_hmac(secret: bytes, key: str) -> bytes:
        raise AssertionError("the digest should come from the memo")

    monkeypatch.setattr(plugin.table, "digest", no_hmac)
    ctx = make_ctx(bearer(USER_KEY))
    await plugin.on_request(ctx)
    assert ctx.identity is not None and ctx.identity.credential_id == "user1"


@pytest.mark.anyio
async def test_unknown_keys_are_not_remembered() -> None:
    plugin = make_plugin()
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            await plugin.on_request(make_ctx(bearer(mint_key("zz"))))
    assert plugin.table._remembered == {}


@pytest.mark.anyio
async def test_a_revoked_store_key_stops_working_although_its_digest_is_remembered() -> None:
    plugin = make_plugin()
    store = FakeStore()
    plugin.store = store  # type: ignore[assignment]
    key = mint_key("rt")
    digest = hash_key(SECRET.encode(), key)
    store.records[digest] = KeyRecord(
        id="rt1", digest=digest, user="u", roles=("user",), source="store"
    )
    for _ in range(2):
        ctx = make_ctx(bearer(key))
        await plugin.on_request(ctx)
        assert ctx.identity is not None and ctx.identity.credential_id == "rt1"
    assert fingerprint(key) in plugin.table._remembered
    # What DELETE /admin/keys/{id} does: drop it from the store, forget the cached record.
    del store.records[digest]
    plugin.cache.forget(digest)
    with pytest.raises(AuthenticationError):
        await plugin.on_request(make_ctx(bearer(key)))
    # Disabled is refused too (the record is read on every request, only the digest is kept).
    store.records[digest] = KeyRecord(
        id="rt1", digest=digest, user="u", roles=("user",), source="store", disabled=True
    )
    plugin.cache.forget(digest)
    with pytest.raises(AuthenticationError):
        await plugin.on_request(make_ctx(bearer(key)))


@pytest.mark.anyio
async def test_a_config_key_disabled_in_the_table_is_refused_although_remembered() -> None:
    plugin = make_plugin()
    await plugin.on_request(make_ctx(bearer(USER_KEY)))
    rec = plugin.table.by_id["user1"]
    plugin.table.by_digest[rec.digest] = dataclasses.replace(rec, disabled=True)
    with pytest.raises(AuthenticationError):
        await plugin.on_request(make_ctx(bearer(USER_KEY)))


def test_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "_MAX_REMEMBERED", 8)
    table = make_plugin().table
    for i in range(50):
        table.remember(fingerprint(f"k{i}"), b"d")
        assert len(table._remembered) <= 8
    assert table.remembered(fingerprint("k49")) == b"d"
