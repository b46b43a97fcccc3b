"""API keys: minting, keyed hashing, and the records they resolve to.

Keys are never stored, only ``HMAC-SHA256(key_secret, key)``: a leaked config file or Redis dump
gives no usable key, and without the server secret not even an offline guess can be checked.
Lookups go by that digest in a dict, so the time a lookup takes does not depend on how many
leading characters of a guess are right (no prefix comparison anywhere).

The HMAC is most of what authenticating a request costs (OpenSSL sets up a keyed context on
every call), so :class:`KeyTable` remembers the digests of keys that resolved to a record, under
a BLAKE2s fingerprint of the key (keyed by a per-process random key): a fifth of the cost, and
the raw key is still never kept. The memo is bounded and needs no invalidation (a key's digest
never changes for a given secret); revocation and expiry act on the record, which is looked up
by digest every time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.context import Identity

if TYPE_CHECKING:
    from plugins.auth.config import KeyEntry

_ALPHABET = string.ascii_letters + string.digits
#: 43 base62 characters carry ~256 bits of randomness.
_RANDOM_CHARS = 43
#: Characters of the random part kept in the human-readable prefix.
_PREFIX_RANDOM = 4
#: Digests remembered by :meth:`KeyTable.digest` (keys that resolved; past this it starts again).
_MAX_REMEMBERED = 4096


def mint_key(label: str = "gw") -> str:
    """A new key, ``sk-<label>-<43 base62 chars>``, from the OS CSPRNG."""
    return f"sk-{label}-" + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))


def key_prefix(key: str) -> str:
    """What humans see: ``sk-<label>-`` plus a few random characters (not enough to guess)."""
    label_end = key.find("-", 3) + 1 if key.startswith("sk-") else 0
    # Never show more than a third of a key, however oddly it is shaped.
    return key[: min(label_end + _PREFIX_RANDOM, len(key) // 3)]


def hash_key(secret: bytes, key: str) -> bytes:
    return hmac.digest(secret, key.encode("utf-8", "surrogatepass"), "sha256")


@dataclass(slots=True)
class KeyRecord:
    """What a key resolves to; ``digest`` identifies it, ``id`` names it."""

    id: str
    digest: bytes
    user: str
    prefix: str = ""
    tenant: str = "default"
    roles: tuple[str, ...] = ()
    tier: str = "default"
    #: Unix time after which the key is refused (None: never).
    expires_at: float | None = None
    disabled: bool = False
    #: "config" (config.yaml) or "store" (created through the admin API).
    source: str = "config"
    created_at: float | None = None
    created_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: What :meth:`identity` gives, built on its first call.
    _identity: Identity | None = field(default=None, init=False, repr=False, compare=False)

    def refusal(self, now: float) -> str | None:
        """Why the key may not be used now, for the log; None when it may."""
        if self.disabled:
            return "key disabled"
        if self.expires_at is not None and now >= self.expires_at:
            return "key expired"
        return None

    def identity(self) -> Identity:
        """The identity the key gives: one (frozen) object for all of its requests."""
        identity = self._identity
        if identity is None:
            identity = self._identity = Identity(
                self.user, self.tenant, self.roles, self.tier, self.id, "api_key"
            )
        return identity

    def public(self) -> dict[str, Any]:
        """The record as the admin API shows it: never the digest."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "user": self.user,
            "tenant": self.tenant,
            "roles": list(self.roles),
            "tier": self.tier,
            "expires_at": self.expires_at,
            "disabled": self.disabled,
            "source": self.source,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }

    def to_json(self) -> dict[str, Any]:
        data = self.public()
        data["digest"] = self.digest.hex()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        return cls(
            id=str(data["id"]),
            digest=bytes.fromhex(data["digest"]),
            user=str(data["user"]),
            prefix=str(data.get("prefix", "")),
            tenant=str(data.get("tenant", "default")),
            roles=tuple(str(r) for r in data.get("roles", ())),
            tier=str(data.get("tier", "default")),
            expires_at=data.get("expires_at"),
            disabled=bool(data.get("disabled", False)),
            source="store",
            created_at=data.get("created_at"),
            created_by=str(data.get("created_by", "")),
        )

    @classmethod
    def from_entry(cls, entry: KeyEntry) -> KeyRecord:
        return cls(
            id=entry.id,
            digest=bytes.fromhex(entry.hash),
            user=entry.user,
            prefix=entry.prefix,
            tenant=entry.tenant,
            roles=entry.roles,
            tier=entry.tier,
            expires_at=entry.expires_at.timestamp() if entry.expires_at else None,
            disabled=entry.disabled,
            source="config",
        )


#: Keys the fingerprints (BLAKE2s keyed mode), drawn per process: a memory dump of the memo
#: still lets no one check a guessed key offline.
_FINGERPRINT_KEY = secrets.token_bytes(32)
#: A hasher already keyed: copying it costs less than keying a new one on every request.
_FINGERPRINT = hashlib.blake2s(key=_FINGERPRINT_KEY)


def fingerprint(key: str) -> bytes:
    """A keyed hash of ``key``: what the digest memo is indexed by, instead of the key
    (``blake2s(key, key=_FINGERPRINT_KEY)``)."""
    h = _FINGERPRINT.copy()
    h.update(key.encode("utf-8", "surrogatepass"))
    return h.digest()


class KeyTable:
    """Keys from config.yaml, indexed by digest."""

    def __init__(self, secret: bytes, entries: tuple[KeyEntry, ...]) -> None:
        self.secret = secret
        #: fingerprint(key) -> hash_key(secret, key), for keys that resolved to a record.
        self._remembered: dict[bytes, bytes] = {}
        self.by_digest: dict[bytes, KeyRecord] = {}
        self.by_id: dict[str, KeyRecord] = {}
        for entry in entries:
            rec = KeyRecord.from_entry(entry)
            self.by_digest[rec.digest] = rec
            self.by_id[rec.id] = rec

    def digest(self, key: str) -> bytes:
        return hash_key(self.secret, key)

    def remembered(self, fp: bytes) -> bytes | None:
        """The digest of the key with this :func:`fingerprint`, if :meth:`remember` kept it."""
        return self._remembered.get(fp)

    def remember(self, fp: bytes, digest: bytes) -> None:
        """Keep the digest of a key that resolved to a record (not of every guess: a flood of
        random keys must not push the real ones out)."""
        if len(self._remembered) >= _MAX_REMEMBERED:
            self._remembered.clear()
        self._remembered[fp] = digest

    def get(self, digest: bytes) -> KeyRecord | None:
        rec = self.by_digest.get(digest)
        # The dict already matched on the digest; compare_digest makes the final equality
        # check constant-time as well, whatever the dict implementation does.
        if rec is not None and hmac.compare_digest(rec.digest, digest):
            return rec
        return None


def now() -> float:
    return time.time()
