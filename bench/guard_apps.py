"""The guard on requests shaped as applications send them: held-out false positives.

    python bench/guard_apps.py                          # the demo config's guard settings
    python bench/guard_apps.py --model-path DIR         # another trained classifier
    python bench/guard_apps.py --roles user,tool        # the classifier on tool results too

``tests/data/guard_apps_holdout.jsonl`` holds 338 chat requests written for a probe of
realistic traffic (27 Nov 2026): support chats, RAG prompts with pasted documents, code help,
agent turns with tool results, data extraction with personal data, translations and summaries
of texts about AI security, security-team work, application system prompts, multi-turn chats,
prompts in nine languages, short follow-ups; 297 benign, 40 attacks in the same shapes, one
ambiguous. None of it is ever trained on (the training script reads ``dev.jsonl`` and the
``guard_hard_negatives*`` files only). Each request goes through the guard plugin's
``on_request`` as the gateway runs it (every layer; the secrets actions of config.yaml), and
the table gives, per group, the requests blocked, then the blocked benign requests with the
layers that blocked them.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.context import RequestContext  # noqa: E402
from gateway.errors import ContentPolicyError  # noqa: E402
from plugins.guard import GuardConfig, GuardPlugin  # noqa: E402

DATA = ROOT / "tests" / "data" / "guard_apps_holdout.jsonl"
#: The secrets actions of the shipped config.yaml.
SECRETS = {"api_key": "block", "private_key": "block", "jwt": "block",
           "credit_card": "redact", "email": "redact"}  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    semantic: dict[str, Any] = {"enabled": not args.no_semantic}
    if args.model_path:
        semantic["model_path"] = args.model_path
    if args.roles:
        semantic["roles"] = args.roles.split(",")
    guard = GuardPlugin(GuardConfig.model_validate({"semantic": semantic, "secrets": SECRETS}))
    await guard.startup(None)  # type: ignore[arg-type]
    counts: Counter[tuple[str, str, str]] = Counter()
    blocked_benign: list[dict[str, Any]] = []
    try:
        for line in args.data.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            body = copy.deepcopy(row["body"])
            body["model"] = "m"
            ctx = RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], body)
            try:
                await guard.on_request(ctx)
                blocked = False
            except ContentPolicyError:
                blocked = True
            counts[row["label"], row["group"], "n"] += 1
            counts[row["label"], row["group"], "blocked"] += blocked
            if blocked and row["label"] == "benign":
                findings = ctx.log["guard"]["input"].get("findings", [])
                blocked_benign.append({"id": row["id"], "by": sorted({
                    f"{f['layer']}:{f.get('id') or f.get('category')}" for f in findings
                })})  # fmt: skip
    finally:
        await guard.shutdown()
    return {"counts": counts, "blocked_benign": blocked_benign}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model-path")
    p.add_argument("--roles", help="semantic.roles, comma-separated (default: user)")
    p.add_argument("--no-semantic", action="store_true", help="rules and secrets only")
    args = p.parse_args()
    result = asyncio.run(run(args))
    counts = result["counts"]
    print("| label | group | blocked |\n|---|---|--:|")
    totals: Counter[tuple[str, str]] = Counter()
    for label, group, key in sorted(counts):
        if key != "n":
            continue
        n, b = counts[label, group, "n"], counts[label, group, "blocked"]
        totals[label, "n"] += n
        totals[label, "b"] += b
        print(f"| {label} | {group} | {b} of {n} |")
    for label in ("benign", "attack"):
        n, b = totals[label, "n"], totals[label, "b"]
        print(f"| **{label}** | all | **{b} of {n}** ({b / max(n, 1):.1%}) |")
    print("\nblocked benign requests:")
    for row in result["blocked_benign"]:
        print(f"  {row['id']}: {', '.join(row['by'])}")


if __name__ == "__main__":
    main()
