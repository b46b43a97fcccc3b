"""The provider interface.

A provider turns an OpenAI-format request into a call to one deployment and gives back an
OpenAI-format answer: a JSON body, or a stream of OpenAI SSE bytes (``data: {...}\\n\\n`` ...
``data: [DONE]\\n\\n``). Providers whose wire format differs (Anthropic) translate both ways, so
the core and every plugin only ever see the OpenAI format.

Transport failures and upstream error statuses are raised as ``GatewayError`` subclasses with
``retryable`` set when another deployment may succeed (connect errors, timeouts, 429, 5xx), so
the route plugin can fail over before the first byte reaches the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
import orjson
from aiohttp import hdrs
from multidict import CIMultiDict
from yarl import URL

from gateway.duequeue import DueQueue
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.headers import upstream_request_headers
from gateway.providers.errors import error_for_status, upstream_error
from gateway.providers.secrets import CREDENTIAL_HEADER, looks_secret, marks, scrub

if TYPE_CHECKING:
    from gateway.catalogue import Deployment
    from gateway.config import UpstreamConfig
    from gateway.context import RequestContext

MAX_ERROR_BODY = 64 * 1024


class UpstreamResponse:
    """An upstream answer whose status was 2xx. Call ``close()`` when done (the core does)."""

    #: The deployment's credentials (``Provider.secrets``): what the upstream's headers and
    #: error events must not carry to the client; and the same in UTF-8, for its bytes.
    secrets: tuple[str, ...] = ()
    secret_bytes: tuple[bytes, ...] = ()
    #: Their leading characters (``marks``), searched for first, in text and in UTF-8.
    secret_marks: tuple[str, ...] = ()
    mark_bytes: tuple[bytes, ...] = ()

    def keep_secrets(self, provider: Provider) -> UpstreamResponse:
        """Take ``provider``'s credentials (the deployment that answered); returns self."""
        self.secrets, self.secret_bytes = provider.secrets, provider.secret_bytes
        self.secret_marks, self.mark_bytes = provider.secret_marks, provider.mark_bytes
        return self

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status
        self.headers = headers

    async def json(self) -> dict[str, Any]:
        raise NotImplementedError

    def iter_bytes(self) -> AsyncIterator[bytes]:
        """OpenAI-format SSE bytes, as they arrive (chunk boundaries are arbitrary)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Provider:
    """One instance per deployment, created at startup and shared by all requests."""

    name: ClassVar[str] = ""

    def __init__(
        self, deployment: Deployment, session: aiohttp.ClientSession, settings: UpstreamConfig
    ) -> None:
        self.deployment = deployment
        self.session = session
        self.settings = settings
        #: The deployment's credentials and headers: fixed at startup, so built once.
        self.static_headers = {k.lower(): v for k, v in self.auth_headers().items()}
        #: What an upstream's error message must never show the client: the deployment's key
        #: and the values of its credential headers (a misconfigured server may echo the
        #: request's headers), when they look like secrets. Not every header value
        #: (``anthropic-version: 2023-06-01``, ``X-Environment: production``) nor a local
        #: server's placeholder key (``anything``, ``lm-studio``): those cut ordinary words out
        #: of every answer.
        values = [v for k, v in self.static_headers.items() if CREDENTIAL_HEADER.search(k)]
        self.secrets = tuple(
            sorted(
                {v for v in (deployment.api_key, *values) if v and looks_secret(v)},
                key=len,
                reverse=True,
            )
        )
        self.secret_bytes = tuple(s.encode() for s in self.secrets)
        self.secret_marks = marks(self.secrets)
        self.mark_bytes = tuple(m.encode() for m in self.secret_marks)
        #: Per request, aiohttp would parse the URL string (~0.5k instructions) and this would
        #: build a context manager (~0.8k): both are the same every time.
        self._urls: dict[str, URL] = {}
        self._errors = upstream_errors(self.name)
        #: The first-byte timeout of every streamed request to this deployment, and the
        #: response timeout of every plain one (settings are frozen): one timer each.
        self.first_byte_timeout = TimeoutQueue(settings.first_byte_timeout_s)
        self.response_timeout = TimeoutQueue(settings.response_timeout_s)
        #: aiohttp's timeouts for a request: the session's, without its read timeout
        #: (``sock_read``), which would otherwise bound the wait for the headers too: cut a
        #: plain answer that takes longer than ``read_timeout_s`` to write, and a stream whose
        #: headers take longer than that within its first-byte timeout (and arm a timer per
        #: request that a stream arriving whole never needs). ``post`` puts it back for the
        #: body once the headers came.
        self.read_timeout = settings.read_timeout_s
        self.request_timeout = aiohttp.ClientTimeout(
            total=settings.total_timeout_s, sock_connect=settings.connect_timeout_s
        )

    def auth_headers(self) -> dict[str, str]:
        """The provider's credentials and the deployment's headers (called once, at startup)."""
        return {}

    @staticmethod
    def output_tokens(deployment: Deployment, asked: int) -> int:
        """The answer length this provider asks the deployment for when the client asked
        ``asked`` (0: none given): what must fit its context window beside the prompt."""
        return asked

    def error_for(self, status: int, headers: Mapping[str, str], raw: bytes) -> GatewayError:
        """The error for an upstream status >= 300 (providers with their own error shape
        override this)."""
        message, code, param = upstream_error(raw)
        return error_for_status(status, headers, message, self.name, code=code, param=param)

    def scrubbed(self, err: GatewayError) -> GatewayError:
        """``err`` with the deployment's credentials cut out of its message (errors caused by
        the request pass the upstream's text on to the client)."""
        err.message = scrub(err.message, self.secrets)
        return err

    async def post(
        self, ctx: RequestContext, path: str, payload: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        """POST ``payload`` to ``base_url + path`` with the rewritten headers; the response once
        its status is 2xx, else the mapped error. A stream's headers are bounded by the
        first-byte timeout; a plain answer's, which come only once the whole answer is written,
        by the response timeout; the body after them by the read timeout."""
        headers = upstream_request_headers(
            ctx.raw_headers, self.static_headers, ctx.upstream_headers, ctx.request_id
        )
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.deployment.base_url + path)
        timer = self.first_byte_timeout if ctx.stream else self.response_timeout
        with self._errors, timer.start():
            resp = await self.session.post(
                url,
                data=orjson.dumps(payload),
                headers=headers,
                allow_redirects=False,
                timeout=self.request_timeout,
            )
            read_timeout_back(resp, self.read_timeout)
            if resp.status >= 300:
                await self._raise_for(resp)
        return resp

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        """Raise the mapped error of ``resp``, whose status is >= 300 (its body read first)."""
        try:
            raw = await resp.content.read(MAX_ERROR_BODY)
        finally:
            resp.close()
        raise self.scrubbed(self.error_for(resp.status, resp.headers, raw))  # type: ignore[arg-type]

    async def chat(self, ctx: RequestContext, body: dict[str, Any]) -> UpstreamResponse:
        """Send a chat completion (``body`` is OpenAI format, model already rewritten)."""
        raise NotImplementedError

    async def embeddings(self, ctx: RequestContext, body: dict[str, Any]) -> UpstreamResponse:
        raise InvalidRequestError(
            f"provider {self.name!r} does not serve embeddings", param="model"
        )


def read_timeout_back(resp: aiohttp.ClientResponse, timeout: float) -> None:
    """Bound the reads of an answer's body (plain or streamed), now that its headers came, by
    the read timeout (``upstream.read_timeout_s``): the request went out without it so that it
    would not bound the wait for the headers (``Provider.request_timeout``), which the response
    or first-byte timeout bounds.

    aiohttp re-arms the timer on every read from the socket and drops it at the body's end;
    a body already whole needs none (a timer armed then would outlive the response)."""
    conn = resp.connection
    protocol = conn.protocol if conn is not None else None
    if protocol is None:
        return
    # Set again by aiohttp for the next request on this connection (set_response_params).
    protocol.read_timeout = timeout
    if not resp.content.is_eof():
        protocol.start_timeout()


class upstream_errors:  # lower case: used like a function, as contextlib.suppress is
    """The one place client errors are mapped: timeout → 504, connect/transport → 502.

    A plain (not async) context manager: it only maps exceptions, which works around awaits as
    well, and costs less than a generator-based one on every upstream call."""

    __slots__ = ("provider",)

    def __init__(self, provider: str) -> None:
        self.provider = provider

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, GatewayError):
            return
        name = self.provider
        if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
            raise UpstreamTimeoutError(f"the {name} upstream timed out", retryable=True) from None
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamError(f"cannot connect to the {name} upstream", retryable=True) from None
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            raise UpstreamError(f"the {name} upstream connection failed", retryable=True) from None


class upstream_timeout:  # lower case: a drop-in for asyncio.timeout
    """``asyncio.timeout(delay)`` for the upstream waits on every request's path: the same
    behaviour (when ``delay`` passes the task is cancelled, and that cancellation leaves the
    block as ``TimeoutError``), as a plain context manager without asyncio.timeout's state
    machine and two coroutines: those cost ~27k instructions per use (callgrind), a fifteenth
    of a whole request through the null proxy, and every stream uses two."""

    __slots__ = ("_cancelling", "_expired", "_handle", "_task", "delay")

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._expired = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("upstream_timeout must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = asyncio.get_running_loop().call_later(self.delay, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._handle.cancel()
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and typ is asyncio.CancelledError
        ):
            raise TimeoutError from exc


class TimeoutQueue(DueQueue):
    """Any number of ``upstream_timeout(delay)`` blocks of one fixed ``delay``, on one event-loop
    timer instead of one each (``DueQueue``): when a block's deadline passes its task is
    cancelled, and that cancellation leaves the block as ``TimeoutError``."""

    __slots__ = ("delay",)

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def start(self) -> _Deadline:
        """A context manager: the block it guards is given ``delay`` seconds from its entry."""
        return _Deadline(self)


class _Deadline:
    """One block under a :class:`TimeoutQueue`; the same protocol as ``upstream_timeout``."""

    __slots__ = ("_queue", "at", "cancelling", "done", "expired", "task")

    def __init__(self, queue: TimeoutQueue) -> None:
        self._queue = queue
        self.done = False
        self.expired = False
        self.task: asyncio.Task[Any] | None = None

    def __enter__(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a TimeoutQueue deadline must be used inside a task")
        self.task = task
        self.cancelling = task.cancelling()
        self.at = loop.time() + self._queue.delay
        self._queue.add(self, loop)

    def fire(self) -> None:
        self.expired = True
        if self.task is not None:
            self.task.cancel()

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.done = True
        # A done deadline may wait in the queue behind a pending one: it must not keep its
        # task (and what the task holds) alive meanwhile.
        task, self.task = self.task, None
        if (
            self.expired
            and task is not None
            and task.uncancel() <= self.cancelling
            and typ is asyncio.CancelledError
        ):
            raise TimeoutError from exc


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request, sending no ``User-Agent`` of its own (the client's, if it sent one,
    is passed on as any other header).

    The same headers as ``skip_auto_headers=("User-Agent",)`` on the session, which makes
    aiohttp build, copy and extend two multidicts per request to honour it: ~9k instructions
    per request (callgrind), 1.5% of the core's whole cost.

    It also copies the given headers in one call rather than one by one in a Python loop."""

    def update_headers(self, headers: Any) -> None:
        # The session hands a CIMultiDict (case-insensitive: one look finds any "Host").
        if type(headers) is not CIMultiDict or hdrs.HOST in headers:
            super().update_headers(headers)
            return
        super().update_headers(None)  # the Host header, as aiohttp writes it
        self.headers.extend(headers)

    def update_auto_headers(self, skip_auto_headers: Any) -> None:
        if skip_auto_headers:  # skips asked for (the gateway asks none): aiohttp's own way
            super().update_auto_headers([*skip_auto_headers, "User-Agent"])
            return
        setdefault = self.headers.setdefault
        for name, value in self.DEFAULT_HEADERS.items():
            setdefault(name, value)


def make_session(settings: UpstreamConfig) -> aiohttp.ClientSession:
    """The one upstream client: explicit timeouts and pool, no cookie jar, no redirects."""
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections,
        limit_per_host=settings.max_connections_per_host,
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.total_timeout_s,
        sock_connect=settings.connect_timeout_s,
        sock_read=settings.read_timeout_s,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        request_class=_UpstreamRequest,  # adds no User-Agent
        json_serialize=lambda o: orjson.dumps(o).decode(),
    )
