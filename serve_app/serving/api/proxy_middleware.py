"""The one middleware that runs inside Ray Serve's HTTP proxy, not in the app: what a client sees when the router
(ingress) replica dies with its request in flight.

Ray's proxy ends such a request without a word: it maps the replica's death (ActorDiedError) to a 500, sends a
body only for 408/429/503, and uvicorn then writes its own plain-text `500 Internal Server Error`. This
middleware wraps the proxy's ASGI app (outside Ray's RequestIdMiddleware; Ray loads it through
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which serve_app/envs.py: `ray_process_env` declares) and:

- sends a request whose response had not started again, with the same body (read up front, at most
  `MAX_JSON_BODY_BYTES`), when that is safe: speech, GET and HEAD, up to `MAX_RETRIES` times with backoff. The
  proxy routes the retry to a live replica or holds it until the new one is up (the replica's restart);
- answers an OpenAI-shaped `503 router_unavailable` with Retry-After when nothing answered still, or when the
  route is not safe to repeat (voice uploads and deletes) or its body was too large to keep;
- ends a started SSE stream that broke off with the app's own `error` event and a clean end; any other started
  body is left cut off (no final chunk), so a truncated audio file never looks complete;
- gives the proxy's own plain-text answers (it writes them for 408/429/503: a request timeout, the router's queue
  full, no router replica) the app's error model: an OpenAI-shaped body; the queue-full 503 becomes the 429
  `backpressure` the app answers for the same Ray error (errors.to_api_error), with Retry-After.

It runs in the proxy process: it imports no torch and nothing of the engine.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware

from serve_app.serving.api.middleware import (
    MAX_JSON_BODY_BYTES, SPEECH_PATH, declared_length, error_response, request_header,
)
from serve_app.serving.errors import (
    ChatterboxError, RateLimitedError, RequestTimeoutError, ServiceUnavailableError, to_api_error,
)

logger = logging.getLogger(__name__)

MAX_RETRIES = 3
RETRY_BACKOFF_S = (0.5, 1.0, 2.0)     # before retry 1, 2, 3; the proxy itself waits for a replacement replica
RETRY_AFTER_S = 1.0
ERROR_CODE = "router_unavailable"
SAFE_METHODS = frozenset({"GET", "HEAD"})
PROXY_ERROR_STATUSES = frozenset({408, 429, 503})   # the statuses Ray's proxy answers itself, in plain text


def proxy_error(status: int, text: str, retry_after: str | None) -> ChatterboxError:
    """The app's error for a plain-text answer of Ray's proxy (`text`: Ray's message)."""
    retry_after_s = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else RETRY_AFTER_S
    message = text.strip().splitlines()[0][:200] if text.strip() else f"HTTP {status} from the proxy"
    if status == 408:
        return RequestTimeoutError(f"{message} Retry, or send less text per request.", code="request_timeout")
    if status == 429 or "backpressure" in text.lower():
        return RateLimitedError(f"{message} Retry later.", code="backpressure", retry_after_s=retry_after_s)
    return ServiceUnavailableError(f"{message} Retry shortly.", code=ERROR_CODE, retry_after_s=retry_after_s)


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH points here)."""
    return [Middleware(LostReplicaRetry)]


def is_retryable(scope: dict) -> bool:
    """A request that may run twice: speech (it changes nothing) and GET/HEAD; never an upload or a delete."""
    method = scope["method"]
    if method in SAFE_METHODS:
        return True
    content_type = (request_header(scope, b"content-type") or "").lower()
    return method == "POST" and scope["path"].endswith(SPEECH_PATH) and not content_type.startswith("multipart/")


class RequestBody:
    """A request's body read up front, replayed to each attempt, then the client's own `receive` (so a client
    that hangs up still reaches the proxy, which cancels the request)."""

    def __init__(self, receive: Callable) -> None:
        self._receive = receive
        self.messages: list[dict] = []
        self.complete = False        # every byte is in `messages`: the request can be sent again
        self.disconnected = False    # the client hung up

    async def read(self, max_bytes: int) -> bool:
        """Reads the body, keeping at most `max_bytes` (the first message past it is kept too, and reading
        stops). -> whether the whole body is here."""
        num_bytes = 0
        while True:
            message = await self._next()
            self.messages.append(message)
            if message["type"] != "http.request":
                return False
            num_bytes += len(message.get("body", b""))
            if num_bytes > max_bytes:
                return False
            if not message.get("more_body", False):
                self.complete = True
                return True

    def receiver(self) -> Callable:
        """A fresh `receive` for one attempt."""
        replay = [dict(m) for m in self.messages]

        async def receive() -> dict:
            if replay:
                return replay.pop(0)
            return await self._next()

        return receive

    async def _next(self) -> dict:
        if self.disconnected:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message


@dataclass
class Attempt:
    """What one run of the inner app sent."""

    started: bool = False
    completed: bool = False
    is_sse: bool = False
    num_body_bytes: int = 0
    expects_trailers: bool = False
    error: Exception | None = None
    proxy_status: int | None = None          # the proxy's own plain-text answer, held back to be reshaped
    proxy_headers: Headers | None = None
    proxy_text: bytes = b""


class LostReplicaRetry:
    """See the module docstring. `backoff_s[i]` is the wait before retry i+1."""

    def __init__(self, app: Any, *, max_retries: int = MAX_RETRIES, backoff_s: Sequence[float] = RETRY_BACKOFF_S,
                 max_body_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        if len(backoff_s) < max_retries:
            raise ValueError(f"backoff_s has {len(backoff_s)} waits for max_retries={max_retries}; "
                             "give one wait per retry")
        self.app = app
        self.max_retries = max_retries
        self.backoff_s = tuple(backoff_s)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = RequestBody(receive)
        declared = declared_length(scope)   # over the limit: the app refuses it (413) unread, and so do we
        retryable = is_retryable(scope) and not (declared is not None and declared > self.max_body_bytes) \
            and await body.read(self.max_body_bytes)
        num_retries = 0
        while True:
            attempt = await self._attempt(scope, body, send)
            if attempt.started or body.disconnected:
                await self._finish(scope, body, send, attempt)
                return
            if not retryable or num_retries >= self.max_retries:
                break
            delay = self.backoff_s[num_retries]
            num_retries += 1
            logger.warning("%s %s (request %s): no response from the router replica (%s); retry %d of %d in %.1fs",
                           scope["method"], scope["path"], _request_id(scope), _why(attempt), num_retries,
                           self.max_retries, delay)
            await asyncio.sleep(delay)
        logger.warning("%s %s (request %s): no response from the router replica (%s) after %d retr%s; answering "
                       "503 %s", scope["method"], scope["path"], _request_id(scope), _why(attempt), num_retries,
                       "y" if num_retries == 1 else "ies", ERROR_CODE)
        exc = ServiceUnavailableError("The router replica serving this request stopped before it answered; retry.",
                                      code=ERROR_CODE, retry_after_s=RETRY_AFTER_S)
        response = error_response(exc, _request_id(scope))
        if not body.complete:
            response.headers["Connection"] = "close"   # the rest of the body was not read
        await response(scope, body.receiver(), send)

    async def _attempt(self, scope: dict, body: RequestBody, send: Callable) -> Attempt:
        attempt = Attempt()

        async def tracked_send(message: dict) -> None:
            kind = message["type"]
            if attempt.proxy_status is not None:   # the body of the proxy's own answer: kept, then reshaped
                if kind == "http.response.body":
                    attempt.proxy_text += message.get("body", b"")
                    if not message.get("more_body", False):
                        attempt.completed = True
                        await self._send_proxy_error(scope, attempt, send)
                return
            if kind == "http.response.start":
                attempt.started = True
                attempt.expects_trailers = bool(message.get("trailers", False))
                headers = Headers(raw=list(message.get("headers", ())))
                content_type = headers.get("content-type", "").lower()
                attempt.is_sse = content_type.startswith("text/event-stream")
                if message.get("status") in PROXY_ERROR_STATUSES and content_type.startswith("text/plain"):
                    attempt.proxy_status, attempt.proxy_headers = message["status"], headers
                    return
            elif kind == "http.response.body":
                attempt.num_body_bytes += len(message.get("body", b""))
                if not message.get("more_body", False) and not attempt.expects_trailers:
                    attempt.completed = True
            elif kind == "http.response.trailers" and not message.get("more_trailers", False):
                attempt.completed = True
            await send(message)

        try:
            await self.app(scope, body.receiver(), tracked_send)
        except Exception as exc:  # noqa: BLE001 - a response not started is retried or answered below
            if attempt.completed:
                raise
            attempt.error = exc
        return attempt

    async def _send_proxy_error(self, scope: dict, attempt: Attempt, send: Callable) -> None:
        text = attempt.proxy_text.decode("utf-8", "replace")
        exc = proxy_error(attempt.proxy_status, text, attempt.proxy_headers.get("retry-after"))
        logger.warning("%s %s (request %s): the proxy answered %d (%s); sent as %d %s", scope["method"],
                       scope["path"], _request_id(scope), attempt.proxy_status, text.strip()[:120],
                       exc.status_code, exc.code)
        response = error_response(exc, _request_id(scope))

        async def no_receive() -> dict:   # a JSONResponse does not read the request
            return {"type": "http.disconnect"}

        await response(scope, no_receive, send)

    async def _finish(self, scope: dict, body: RequestBody, send: Callable, attempt: Attempt) -> None:
        """The response started, or the client left: end it as the module docstring says."""
        if not attempt.started or attempt.completed:
            return   # the client left before an answer (nobody to answer), or the answer is whole
        if attempt.proxy_status is not None:   # the proxy's own answer broke off: send what it was to say
            if not body.disconnected:
                await self._send_proxy_error(scope, attempt, send)
            return
        if attempt.is_sse and not body.disconnected:
            exc = ServiceUnavailableError("The router replica serving this stream stopped; the stream ends here. "
                                          "Retry the request.", code=ERROR_CODE, retry_after_s=RETRY_AFTER_S)
            logger.warning("%s %s (request %s): the SSE stream broke off after %d bytes (%s); ending it with an "
                           "error event %s", scope["method"], scope["path"], _request_id(scope),
                           attempt.num_body_bytes, _why(attempt), ERROR_CODE)
            await send({"type": "http.response.body", "body": to_api_error(exc).to_sse_event(), "more_body": False})
            return
        if not body.disconnected:
            logger.warning("%s %s (request %s): the response broke off after %d bytes (%s); leaving it cut off",
                           scope["method"], scope["path"], _request_id(scope), attempt.num_body_bytes, _why(attempt))
        if attempt.error is not None:
            raise attempt.error   # the server closes the connection: the body has no final chunk


def _request_id(scope: dict) -> str | None:
    """Ray's RequestIdMiddleware (inside this one) writes x-request-id into the scope on the first attempt."""
    return request_header(scope, b"x-request-id")


def _why(attempt: Attempt) -> str:
    return repr(attempt.error) if attempt.error is not None else "the proxy ended the request"
