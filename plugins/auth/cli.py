"""``gateway keys ...``: mint API keys and print the config entry to paste.

    gateway keys create --user alice --roles user --tier free [--expires-in 30d]
    gateway keys create --config config.yaml --store --user bob     # straight into Redis
    echo -n "$KEY" | gateway keys hash                                # hash an existing key

The key is printed once and never stored; config.yaml and Redis hold only its HMAC. The secret
comes from ``--config`` (the auth plugin's ``key_secret``) or ``$GATEWAY_KEY_SECRET``, never from
the command line, where other users could read it in the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

import yaml

from plugins.auth.config import DEMO_SECRET, AuthConfig
from plugins.auth.keys import KeyRecord, hash_key, key_prefix, mint_key

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CliError(Exception):
    pass


def parse_duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise CliError(f"bad duration {text!r}: use e.g. 3600s, 90m, 12h, 30d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _auth_config(path: str) -> AuthConfig:
    from gateway.config import load_settings

    settings = load_settings(path)
    entry = next((e for e in settings.pipeline if e.name == "auth"), None)
    if entry is None:
        raise CliError(f"{path}: no auth plugin in the pipeline")
    return AuthConfig.model_validate(entry.config)


def _secret(args: argparse.Namespace, err: TextIO) -> tuple[str, AuthConfig | None]:
    cfg = _auth_config(args.config) if args.config else None
    secret = cfg.key_secret if cfg else os.environ.get("GATEWAY_KEY_SECRET", "")
    if len(secret.encode()) < 16:
        raise CliError("set GATEWAY_KEY_SECRET (16+ bytes) or pass --config config.yaml")
    if secret == DEMO_SECRET:
        print("warning: using the demo key secret; fine locally, never in production", file=err)
    return secret, cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway keys", description="Manage gateway API keys.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="mint a key; print it once plus its config entry")
    c.add_argument("--user", required=True)
    c.add_argument("--tenant", default="default")
    c.add_argument("--roles", default="user", help="comma-separated (default: user)")
    c.add_argument("--tier", default="default")
    c.add_argument("--id", default="", help="key id (default: key-<random>)")
    c.add_argument("--label", default="gw", help="goes into the key: sk-<label>-...")
    c.add_argument("--expires-in", default="", help="e.g. 30d, 12h (default: never)")
    c.add_argument("--config", default="", help="read key_secret (and store) from this file")
    c.add_argument("--store", action="store_true", help="write to the Redis store of --config")
    h = sub.add_parser("hash", help="print the hash of a key read from stdin")
    h.add_argument("--config", default="")
    return p


def _create(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if not re.match(r"^[a-z0-9]{1,16}$", args.label):
        raise CliError("--label must be 1-16 lowercase letters or digits")
    secret, cfg = _secret(args, err)
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    if cfg is not None:
        unknown = [r for r in roles if r not in cfg.roles]
        if unknown:
            raise CliError(f"unknown role {unknown[0]!r}; defined: {', '.join(sorted(cfg.roles))}")
    key = mint_key(args.label)
    key_id = args.id or f"key-{secrets.token_hex(6)}"
    expires = time.time() + parse_duration(args.expires_in) if args.expires_in else None
    if args.store:
        if cfg is None or cfg.store.type != "redis":
            raise CliError("--store needs --config with auth.store.type: redis")
        record = KeyRecord(
            id=key_id,
            digest=hash_key(secret.encode(), key),
            user=args.user,
            prefix=key_prefix(key),
            tenant=args.tenant,
            roles=roles,
            tier=args.tier,
            expires_at=expires,
            source="store",
            created_at=time.time(),
            created_by="cli",
        )
        asyncio.run(_store(cfg, record))
        print(f"API key (shown once; stored in Redis as {key_id}):\n  {key}", file=out)
        return 0
    entry = {
        "id": key_id,
        "hash": hash_key(secret.encode(), key).hex(),
        "prefix": key_prefix(key),
        "user": args.user,
        "tenant": args.tenant,
        "roles": list(roles),
        "tier": args.tier,
        "expires_at": (datetime.fromtimestamp(int(expires), UTC).isoformat() if expires else None),
        "disabled": False,
    }
    snippet = yaml.safe_dump([entry], sort_keys=False, default_flow_style=None)
    print(f"API key (shown once, store it now):\n  {key}\n", file=out)
    print("Add to config.yaml under the auth plugin's `keys:`", file=out)
    # Indented as the shipped config.yaml's keys are (pipeline > auth > config > keys).
    print("\n".join("        " + line for line in snippet.splitlines()), file=out)
    return 0


async def _store(cfg: AuthConfig, record: KeyRecord) -> None:
    from plugins.auth.store import RedisKeyStore

    store = RedisKeyStore(cfg.store.url, cfg.store.prefix)
    try:
        await store.create(record)
        await store.audit(
            {
                "event": "auth.key_created",
                "actor": "cli",
                "key_id": record.id,
                "key_user": record.user,
                "roles": list(record.roles),
                "at": time.time(),
            }
        )
    finally:
        await store.close()


def _hash(args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> int:
    secret, _ = _secret(args, err)
    key = inp.read().strip()
    if not key:
        raise CliError("no key on stdin")
    print(f"hash: {hash_key(secret.encode(), key).hex()}\nprefix: {key_prefix(key)}", file=out)
    return 0


def keys_main(
    argv: list[str],
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    inp, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = _parser().parse_args(argv)
    try:
        if args.command == "create":
            return _create(args, out, err)
        return _hash(args, inp, out, err)
    except CliError as e:
        print(f"gateway keys: {e}", file=err)
        return 2
    except Exception as e:  # config errors name file and key already
        print(f"gateway keys: {e}", file=err)
        return 2
