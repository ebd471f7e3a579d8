"""The ASGI middlewares of the speech app: API keys, body size, speech admission. `build_app` adds them in one
place, outermost first:

    ApiKeyAuth -> BodySizeLimit -> SpeechAdmission -> FastAPI routes

Each answers a request it turns away with the one error mapping (OpenAI-shaped JSON, errors.to_api_error), so
a rejected request never reaches a route: an anonymous request reads no body, an oversized one takes no speech
slot.
"""
from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from serve_app.serving.errors import (
    AuthenticationError,
    BodyLimitExceeded,
    PayloadTooLargeError,
    RateLimitedError,
    to_api_error,
)

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})   # probes: no API key
MAX_JSON_BODY_BYTES = 1024 * 1024                 # a 4096-character input with every knob is far below this
MULTIPART_OVERHEAD_BYTES = 64 * 1024              # form boundaries and part headers around an uploaded voice
SPEECH_PATH = "/v1/audio/speech"
VOICES_PATH = "/v1/voices"


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """Any exception as its OpenAI-shaped JSON response (status, body and headers from to_api_error)."""
    api_error = to_api_error(exc)
    headers = dict(api_error.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(api_error.body.model_dump(), status_code=api_error.status_code, headers=headers)


def request_header(scope: dict, name: bytes) -> str | None:
    """A request header from the ASGI scope (`name` lower-case), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def declared_length(scope: dict) -> int | None:
    """The request's Content-Length, or None (none declared; a malformed one is the server's to reject)."""
    try:
        return int(request_header(scope, b"content-length") or "")
    except ValueError:
        return None


def check_api_key(authorization: str | None, api_keys: list[str]) -> None:
    """Raises AuthenticationError unless `authorization` is `Bearer <one of api_keys>` (no keys: no auth).
    Keys are compared in constant time and never logged."""
    if not api_keys:
        return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in api_keys):
        raise AuthenticationError("Incorrect API key.", code="invalid_api_key")


class ApiKeyAuth:
    """Every route but the probes (`OPEN_PATHS`) needs `Authorization: Bearer <key>` when the router has API
    keys: the /v1 API, the OpenAPI schema and docs, and unknown paths (401, not 404, to anonymous callers)."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        try:
            check_api_key(request_header(scope, b"authorization"), self.router.settings.api_keys)
        except AuthenticationError as exc:
            self.router.record_request(_route_label(scope), exc.status_code, time.monotonic())
            await error_response(exc, request_header(scope, b"x-request-id"))(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Request bodies are limited by the bytes that arrive (LitServe's MaxSizeMiddleware pattern): a declared
    Content-Length over the limit is refused before anything is read, and a body without one (chunked) is cut
    off at the limit as it streams in, never spooled whole first. Voice uploads get the upload limit plus form
    overhead; every other request `MAX_JSON_BODY_BYTES`. The answer is an OpenAI-shaped 413."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app = app
        self.router = router

    def limit_for(self, scope: dict) -> tuple[int, PayloadTooLargeError]:
        if scope["method"] == "POST" and scope["path"] == VOICES_PATH:
            upload = self.router.settings.max_voice_upload_bytes
            return upload + MULTIPART_OVERHEAD_BYTES, PayloadTooLargeError(
                f"The upload is over the limit of {upload} bytes for a voice file. Send a shorter clip.",
                param="file", code="file_too_large")
        return MAX_JSON_BODY_BYTES, PayloadTooLargeError(
            f"The request body is over the limit of {MAX_JSON_BODY_BYTES} bytes.", code="body_too_large")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, error = self.limit_for(scope)
        request_id = request_header(scope, b"x-request-id")
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, error, request_id)
            return

        received = 0
        response_started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # raised inside the app's body read; FastAPI passes HTTPExceptions through unchanged, and the
                    # route's error mapping (or the except below) answers with `error`
                    raise BodyLimitExceeded(error)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyLimitExceeded as exc:
            if response_started:
                raise
            await self._refuse(scope, receive, send, exc.error, request_id)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable, error: PayloadTooLargeError,
                      request_id: str | None) -> None:
        self.router.record_request(_route_label(scope), error.status_code, time.monotonic())
        response = error_response(error, request_id)
        response.headers["Connection"] = "close"   # the rest of the body is not read
        await response(scope, receive, send)


class SpeechAdmission:
    """At most `max_active_speech_requests` speech requests run in a router replica at once (streams count until
    their last byte); the next one gets an OpenAI-shaped 429 at once. Keep the cap below the deployment's Ray
    `max_ongoing_requests`: requests past that wait in Ray's proxy, and past its `max_queued_requests` the proxy
    answers a plain-text 503 that this app never sees."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app = app
        self.router = router
        self.active = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != SPEECH_PATH:
            await self.app(scope, receive, send)
            return
        cap = self.router.settings.max_active_speech_requests
        if self.active >= cap:
            exc = RateLimitedError(f"This server is running its maximum of {cap} speech requests; retry shortly.",
                                   code="server_busy", retry_after_s=1.0)
            self.router.record_request("speech", exc.status_code, time.monotonic(), stream=False)
            await error_response(exc, request_header(scope, b"x-request-id"))(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _route_label(scope: dict) -> str:
    """The `route` tag of a request turned away before routing (a few values: metric cardinality)."""
    return "speech" if scope["path"] == SPEECH_PATH else "other"
