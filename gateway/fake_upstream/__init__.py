"""A fake OpenAI-compatible upstream for tests, demos and the benchmark.

It answers ``/v1/chat/completions`` (plain and SSE), ``/v1/embeddings`` and ``/v1/models`` with
deterministic content, injects failures on demand and records what it received::

    python -m gateway.fake_upstream --host 127.0.0.1 --port 9911 [--chunks 20 --delay-ms 5 ...]

Behaviour is resolved per request, later sources winning: server defaults (``create_app(**kw)``
or CLI flags) < the per-model map (``create_app(behaviours={"broken": {"status": 503}})``) <
request headers (``x-fake-status: 503``). The gateway forwards ordinary client headers, so
end-to-end tests steer the fake through the gateway; the model map makes one deployment fail
while another of the same public model works.

==================  ======================  ====================================================
header              field                   effect
==================  ======================  ====================================================
x-fake-chunks       chunks (20)             content chunks in a stream
x-fake-delay-ms     delay_ms (0)            sleep between stream chunks
x-fake-status       status (0 = none)       answer with this status and an OpenAI error body
x-fake-retry-after  retry_after ("")        ``Retry-After`` header on injected errors
x-fake-hang-ms      hang_ms (0)             sleep before the response headers (first byte)
x-fake-drop-after   drop_after (-1 = none)  stream: K content chunks, then the connection is
                                            cut; non-stream: the body is cut after K bytes
x-fake-stall-after  stall_after (-1 = none) stream: K content chunks, then nothing more on an
                                            open connection (a stalled model); non-stream: the
                                            headers and K bytes of the body, then nothing
x-fake-no-usage     no_usage (false)        omit ``usage`` (and the stream's usage chunk)
x-fake-content      content (echo)          exact assistant text (e.g. a secret for the guard)
x-fake-error-code   error_code ("")         ``code`` of an injected error's body (default: the
                                            status's usual one, e.g. ``rate_limit_exceeded``;
                                            the Anthropic fake, which has no codes, answers
                                            ``context_length_exceeded`` in Anthropic's words)
x-fake-error-param  error_param ("")        ``param`` of an injected error's body
x-fake-annotations  annotations ("")        the message's ``annotations`` (a JSON list, e.g. a
                                            ``url_citation``); a stream sends them in one delta
                                            before the finish chunk
x-fake-usage        usage ("")              a JSON object merged into the answer's ``usage``
                                            (a null value removes a key), e.g.
                                            ``{"prompt_tokens_details": {"cached_tokens": 9}}``
==================  ======================  ====================================================

Content is ``"Echo: " + the first 200 characters of the last user message``. Usage counts are
whitespace-separated words (prompt: every message's text; completion: the content): cheap and
deterministic, not tiktoken. A stream splits the content into ``chunks`` slices whose
concatenation is exactly the content (slices may be empty when the content is short).

Test endpoints: ``GET/DELETE /_fake/requests`` (the last ``record`` requests: method, path,
headers as pairs, parsed JSON body) and ``GET/DELETE /_fake/stats`` (counters: a stream the
client abandons counts in ``streams_cancelled``; ``requests_cancelled`` counts requests
abandoned in any phase, hang included).

Extension hook: if ``gateway/fake_anthropic.py`` exists, ``create_app`` calls its
``register(app: aiohttp.web.Application)``, which adds its routes. It should reuse
``gateway.fake_upstream.state`` (``read_json`` records the request, ``prelude`` applies hang and
status injection, ``behaviour_for``, ``error_response``, ``counts_cancel``, ``cut``, and
``app[STATE].stats`` for stream counters) so every API shares recording, ``x-fake-*`` and stats.

Modules: ``state`` (behaviour, recording, counters, ``/_fake``), ``openai_api`` (endpoints),
``app`` (``create_app``, ``start``), ``cli`` (``main``).
"""

from __future__ import annotations

from gateway.fake_upstream.app import create_app, start
from gateway.fake_upstream.cli import main
from gateway.fake_upstream.state import STATE, Behaviour, FakeState, behaviour_for

__all__ = ["STATE", "Behaviour", "FakeState", "behaviour_for", "create_app", "main", "start"]
