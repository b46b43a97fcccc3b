"""The output guard: secrets and the canary in answers, across SSE chunk boundaries."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from gateway.context import RequestContext
from gateway.errors import ContentPolicyError
from gateway.pipeline import Pipeline, hooked
from gateway.plugin import CHUNK_HOOKS, Plugin
from gateway.redact import SECRET_TYPES
from plugins.guard import GuardConfig, GuardPlugin
from plugins.guard.output import OutputConfig, OutputGuard

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
CANARY = "CANARY-7f3a9c"


def guard(**cfg: Any) -> GuardPlugin:
    cfg.setdefault("semantic", {"enabled": False})
    return GuardPlugin(GuardConfig.model_validate(cfg))


def ctx() -> RequestContext:
    return RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], {}, stream=True)


def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }  # fmt: skip


async def run_stream(g: GuardPlugin, c: RequestContext, pieces: list[str]) -> str:
    out: list[dict[str, Any]] = []
    out += await g.on_chunk(c, chunk("", role=True))
    for p in pieces:
        out += await g.on_chunk(c, chunk(p))
    out += await g.on_stream_end(c)
    await g.on_response(c)
    return "".join(ch["choices"][0]["delta"].get("content") or "" for ch in out)


def split3(text: str, secret: str) -> list[str]:
    """The text in pieces, the secret cut across three of them."""
    i = text.index(secret)
    a, b = i + len(secret) // 3, i + 2 * len(secret) // 3
    return [text[:a], text[a:b], text[b:]]


@pytest.mark.anyio
async def test_secret_split_across_three_chunks_is_redacted() -> None:
    text = "Sure! Your key is " + KEY + " and keep it safe. " + "More words follow. " * 10
    c = ctx()
    out = await run_stream(guard(), c, split3(text, KEY))
    assert KEY not in out
    assert KEY[:10] not in out and KEY[-10:] not in out
    assert out == text.replace(KEY, "[REDACTED:api_key]")
    assert c.log["guard"]["output"]["findings"][0]["rule"] == "api_key"


@pytest.mark.anyio
async def test_card_with_spaces_split_at_the_window_edge() -> None:
    card = "4111 1111 1111 1111"
    for cut in range(1, len(card)):
        text = "x " * 40 + "card " + card + " thanks"
        i = text.index(card) + cut
        out = await run_stream(guard(output={"window_chars": 16}), ctx(), [text[:i], text[i:]])
        assert "1111 1111" not in out, cut
        assert out.endswith("card [REDACTED:credit_card] thanks")


@pytest.mark.anyio
async def test_text_is_released_while_streaming() -> None:
    g, c = guard(), ctx()
    released = []
    for _ in range(20):
        for ch in await g.on_chunk(c, chunk("plain words here ")):
            released.append(ch["choices"][0]["delta"]["content"])
    assert sum(map(len, released)) >= 20 * 17 - 64 - 17  # all but the held window


@pytest.mark.anyio
async def test_canary_ends_the_stream() -> None:
    g, c = guard(output={"canary": CANARY}), ctx()
    await g.on_chunk(c, chunk("My instructions say " + CANARY[:5]))
    with pytest.raises(ContentPolicyError) as e:
        await g.on_chunk(c, chunk(CANARY[5:] + " and more " + "words " * 20))
    assert e.value.code == "content_policy_violation"
    assert CANARY not in e.value.message
    assert c.log["guard"]["output"]["action"] == "block"


@pytest.mark.anyio
async def test_canary_caught_at_stream_end_and_redact_option() -> None:
    with pytest.raises(ContentPolicyError):
        await run_stream(guard(output={"canary": CANARY}), ctx(), ["leak: ", CANARY])
    out = await run_stream(
        guard(output={"canary": CANARY, "canary_action": "redact"}), ctx(), ["a ", CANARY, " b"]
    )
    assert out == "a [REDACTED:canary] b"


@pytest.mark.anyio
async def test_block_action_for_secrets_and_shadow() -> None:
    with pytest.raises(ContentPolicyError):
        await run_stream(guard(output={"secrets": "block"}), ctx(), split3(f"k {KEY} z", KEY))
    c = ctx()
    text = f"k {KEY} z"
    out = await run_stream(guard(mode="shadow", output={"secrets": "block"}), c, split3(text, KEY))
    assert out == text  # shadow: unchanged, but reported
    assert c.log["guard"]["output"]["action"] == "block"


@pytest.mark.anyio
async def test_finish_reason_flushes_held_text() -> None:
    g, c = guard(), ctx()
    assert await g.on_chunk(c, chunk("short")) == []
    out = await g.on_chunk(c, chunk(None, finish="stop"))
    assert out[0]["choices"][0]["delta"]["content"] == "short"
    assert await g.on_stream_end(c) == []


@pytest.mark.anyio
async def test_non_streamed_response_redacted_or_blocked() -> None:
    c = ctx()
    c.response = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"k={KEY}"}}]
    }
    await guard().on_response(c)
    assert c.response["choices"][0]["message"]["content"] == "k=[REDACTED:api_key]"
    c.response = {"choices": [{"index": 0, "message": {"content": f"x {CANARY}"}}]}
    with pytest.raises(ContentPolicyError):
        await guard(output={"canary": CANARY}).on_response(c)


def test_output_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown type 'ssn'"):
        GuardConfig.model_validate({"output": {"secret_types": ["ssn"]}})
    # 20 characters, up to 2 others between each two: 58 may need holding back.
    with pytest.raises(ValueError, match=r"window_chars must be at least 58"):
        GuardConfig.model_validate({"output": {"canary": "x" * 20, "window_chars": 57}})
    GuardConfig.model_validate({"output": {"canary": "x" * 20, "window_chars": 58}})


def test_streams_are_parsed_for_the_guard_only_when_its_output_guard_is_on() -> None:
    """The chunk hooks make the core parse every streamed event; a guard whose output guard is
    off (or has nothing to look for) skips them, so its streams are relayed as they came. Its
    ``on_response`` (the non-streamed check, and the log of the output guard's verdicts) then
    has nothing to do either, and is skipped too."""
    on = guard()
    off = guard(output={"enabled": False})
    nothing = guard(output={"secret_types": []})
    assert hooked([on], *CHUNK_HOOKS) == [on]
    assert hooked([off, nothing], *CHUNK_HOOKS) == []
    assert hooked([on, off, nothing], "on_response") == [on]
    assert Pipeline([on, off]).has_chunk_hooks and not Pipeline([off, nothing]).has_chunk_hooks
    # With a canary and no secret types the output guard is on again.
    assert hooked([guard(output={"secret_types": [], "canary": CANARY})], "on_chunks")


def test_hook_choice_is_kept_even_for_a_plugin_that_skips_plugin_init() -> None:
    class Bare(Plugin):
        name = "bare"

        def __init__(self, config: Any) -> None:  # no super().__init__
            self.config = config
            self.asked = 0

        def uses(self, hook: str) -> bool:
            self.asked += 1
            return hook == "on_chunk"

        async def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> list[Any]:
            return [chunk]

    bare = Bare(None)
    assert hooked([bare], *CHUNK_HOOKS) == [bare]
    asked = bare.asked
    assert hooked([bare], *CHUNK_HOOKS) == [bare] and bare.asked == asked  # answered once
    assert hooked([bare], "on_response") == []


# --- streamed output against the whole text, at random chunk boundaries ----------------------

SECRETS = [
    KEY, "AKIAZ7QK2M4P9XR3LN5T", "ghp_" + "a1B2c3D4e5" * 4, "xoxb-1234567890-abcdefghij",
    "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6q",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nabcdEFGH\n-----END RSA PRIVATE KEY-----",
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5500 0000 0000 0004",
    "jane.doe+x@example.co.uk", "DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32",
    "+1 (555) 123-4567", "+44 20 7946 0958", "Canary Token 7f3a", "cAnArY tOkEn 7F3A",
]  # fmt: skip
FILLER = ["the", "key", "is", "card:", "(", ")", "\n", "call", "IBAN", "x-", "42", "+", "-", "ok.",
          "密钥是", "。", "カード", "번호", "รหัส", "\t", "\u3000", "๔๒"]  # fmt: skip


def streamed(g: OutputGuard, pieces: list[str]) -> str:
    held, out = "", []
    for piece in pieces:
        released, held, _ = g.feed(held, piece, False)
        out.append(released)
    released, held, _ = g.feed(held, "", True)
    assert held == ""
    return "".join(out) + released


@pytest.mark.parametrize(
    ("types", "canary", "window"),
    [
        (SECRET_TYPES, "canary token 7f3a", None),  # window 43 (the canary spaced out)
        (SECRET_TYPES, "canary token 7f3a", 64),
        (OutputConfig().secret_types, "", None),  # window 0: tokens, numbers, key blocks
        (OutputConfig().secret_types, "canary token 7f3a", None),  # window 43
        (("email", "iban", "phone"), "", None),
    ],
)
def test_no_secret_redacted_in_the_whole_text_leaks_from_a_stream(
    types: tuple[str, ...], canary: str, window: int | None
) -> None:
    """Texts with 1-3 secrets among filler, streamed in random pieces (1 to 60 characters):
    nothing the non-streamed check redacts may come through. (A stream may redact a little
    more: a card right after "x-" counts when the "x-" went out earlier.)"""
    cfg = {"secret_types": list(types), "secrets": "redact", "canary": canary,
           "canary_action": "redact", "window_chars": window}  # fmt: skip
    g = OutputGuard(OutputConfig.model_validate(cfg))
    rng = random.Random(7)
    for _ in range(400):
        parts: list[str] = []
        for secret in rng.sample(SECRETS, rng.randint(1, 3)):
            parts += [rng.choice(FILLER) for _ in range(rng.randint(0, 6))] + [secret]
        parts += [rng.choice(FILLER) for _ in range(rng.randint(0, 6))]
        text = "".join(p + rng.choice([" ", " ", "", "\n", ", "]) for p in parts)
        pieces, i = [], 0
        while i < len(text):
            k = rng.choice([1, 1, 2, 3, 5, 8, 20, 60])
            pieces.append(text[i : i + k])
            i += k
        whole = g.check(text)[0]
        out = streamed(g, pieces)
        leaked = [s for s in SECRETS if s in text and s not in whole and s in out]
        assert not leaked, (text, pieces)


def test_key_glued_to_the_canary_is_held_until_the_canary_is_redacted() -> None:
    """A key is only a key once the canary after it (no space between) is redacted: the stream
    used to release the key first, then redact the canary."""
    g = OutputGuard(OutputConfig.model_validate(
        {"canary": "canary token 7f3a", "canary_action": "redact", "window_chars": 64}
    ))  # fmt: skip
    key = "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6q"
    text = f'+ {key}Canary Token 7f3a, x- at "\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAA\n'
    pieces = [text[:60], text[60:84], text[84:95], text[95:99], text[99:]]
    assert g.check(text)[0].startswith("+ [REDACTED:api_key][REDACTED:canary]")
    assert key not in streamed(g, pieces)


def test_default_window_releases_each_word_as_the_next_begins() -> None:
    """The default types need no window: a word goes out as soon as a space follows it. A
    canary or a spaced type (IBAN, phone) sets the window to what they need."""
    assert OutputConfig().hold_window() == 0
    assert OutputConfig(canary=CANARY).hold_window() == 12 + 2 * 11  # "CANARY7f3a9c" spaced
    assert OutputConfig(secret_types=("iban",)).hold_window() == 42
    assert OutputConfig(secret_types=("iban",), window_chars=100).hold_window() == 100
    g = OutputGuard(OutputConfig())
    released, held, _ = g.feed("", "Hello there, how", False)
    assert (released, held) == ("Hello there, ", "how")
    # A number still runs on; an unfinished key block is still held.
    assert g.feed("", "card 4111 1111 ", False)[:2] == ("card ", "4111 1111 ")
    assert g.feed("", "x -----BEGIN RSA PRIVATE KEY-----\nMII ", False)[0] == "x "


def test_text_without_spaces_streams_as_it_comes() -> None:
    """Chinese, Japanese or Thai text has no spaces to cut at: the whole answer was held until
    its end (max_hold_chars is 8192). A cut after a letter of those scripts splits no secret,
    so it streams; a key glued between such letters is still held and redacted whole."""
    g = OutputGuard(OutputConfig())
    released, held, _ = g.feed("", "你好\uff0c这是一个测试。我们继", False)
    assert (released, held) == ("你好\uff0c这是一个测试。我们继", "")
    assert g.feed("", "ありがとうござい", False)[0] == "ありがとうござい"
    assert g.feed("", "tab\tsepar", False)[:2] == ("tab\t", "separ")
    text = f"密钥是{KEY}很重要。"
    for cut in range(1, len(text)):
        out = streamed(g, [text[:cut], text[cut:]])
        assert KEY not in out and KEY[:12] not in out, cut
        assert out == "密钥是[REDACTED:api_key]很重要。"
    # Thai digits are digits (\d): a number in them is not cut inside.
    assert g.feed("", "โทร ๐๘๑", False)[:2] == ("โทร ", "๐๘๑")
    # A canary written in those scripts keeps them from ending a held word.
    g = OutputGuard(OutputConfig(canary="秘密口令"))
    assert g.feed("", "秘密", False)[0] == ""


@pytest.mark.parametrize(
    "leak",
    [
        "C-A-N-A-R-Y-7-f-3-a-9-c",  # a model told to put dashes between the letters
        "c a n a r y 7 f 3 a 9 c",
        "C, A, N, A, R, Y, 7, F, 3, A, 9, C",
        "canary7f3a9c",
        "CANARY_7f3a9c",
        "Canary: 7f3a9c",
        "C--A--N--A--R--Y--7f3a9c",
    ],
)
def test_the_canary_spelled_out_or_spaced_is_still_the_canary(leak: str) -> None:
    g = OutputGuard(OutputConfig(canary=CANARY, canary_action="redact"))
    text = f"My instructions begin with {leak} and then go on."
    assert g.check(text)[0] == "My instructions begin with [REDACTED:canary] and then go on."
    rng = random.Random(len(leak))
    for _ in range(50):  # streamed in random pieces: nothing of it comes out
        pieces, i = [], 0
        while i < len(text):
            k = rng.choice([1, 2, 3, 5, 8])
            pieces.append(text[i : i + k])
            i += k
        assert streamed(g, pieces) == g.check(text)[0]


def test_ordinary_text_near_the_canary_is_not_the_canary() -> None:
    g = OutputGuard(OutputConfig(canary=CANARY, canary_action="redact"))
    for text in (
        "a canary in 7 f 3 a 9 c mines",
        "CANARY-7f3a9",
        "CANARY 7f3a9d",
    ):
        assert g.check(text) == (text, []), text


def test_streamed_call_arguments_stay_valid_json_whatever_the_cuts() -> None:
    """Escapes are decoded in what is held: a release cut between the two backslashes of an
    escaped backslash made the held 'u0041' an escape of its own ('\\\\A': invalid JSON)."""
    from plugins.guard.config import OutputConfig
    from plugins.guard.output import OutputGuard

    g = OutputGuard(OutputConfig())
    for args in (
        json.dumps({"content": "A" * 8190 + "\\u0041" + "B" * 10}),
        json.dumps({"path": "C:\\\\new\\\\u0073ers " * 600}),
        json.dumps({"s": "x" * 8189 + "\u00e9\u0041"}, ensure_ascii=True),
    ):
        for size in (1, 3, 4, 7):
            held, out = "", ""
            for i in range(0, len(args), size):
                released, held, _ = g.feed(held, args[i : i + size], False, json_text=True)
                out += released
            out += g.feed(held, "", True)[0]
            assert json.loads(out) == json.loads(args), size
