"""The one error model: typed exceptions, and exactly one function (`to_api_error`) that maps any exception to an
HTTP status, an OpenAI-shaped `ErrorResponse` and headers.

Stages may raise these exceptions too (they pickle); across a Ray handle they arrive wrapped in a
`RayTaskError`, which `to_api_error` unwraps. Everything else the router renders (JSON responses, SSE `error`
events, FastAPI exception handlers) goes through `to_api_error`.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fastapi.exceptions import RequestValidationError
from fastapi.sse import format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.serving.protocol import ErrorEvent, ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 1

try:  # Ray is always installed in production; the import is guarded so the protocol layer stays usable alone.
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    # the replica a request ran on died or became unreachable: the same request can run again on another
    _REPLICA_LOST_ERRORS: tuple[type[BaseException], ...] = (ReplicaUnavailableError, ActorDiedError,
                                                             ActorUnavailableError)
    _UNAVAILABLE_RAY_ERRORS: tuple[type[BaseException], ...] = (DeploymentUnavailableError, *_REPLICA_LOST_ERRORS)
except ImportError:  # pragma: no cover
    RayTaskError = BackPressureError = None  # type: ignore[assignment,misc]
    _REPLICA_LOST_ERRORS = _UNAVAILABLE_RAY_ERRORS = ()


class ChatterboxError(Exception):
    """Base of every error the API reports on purpose. Subclasses fix the status and OpenAI error type."""

    status_code = 500
    error_type = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # keyword-only fields survive pickling across Ray handles
        return (_rebuild_error, (type(self), self.message, self.param, self.code, self.retry_after_s))


def _rebuild_error(cls, message, param, code, retry_after_s):
    return cls(message, param=param, code=code, retry_after_s=retry_after_s)


class InvalidRequestError(ChatterboxError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(ChatterboxError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(ChatterboxError):
    status_code = 404
    error_type = "not_found_error"


class VoiceNotFoundError(NotFoundError):
    def __init__(self, message: str, *, param: str | None = "voice", code: str | None = "voice_not_found",
                 retry_after_s: float | None = None):
        super().__init__(message, param=param, code=code, retry_after_s=retry_after_s)


class PayloadTooLargeError(ChatterboxError):
    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaError(ChatterboxError):
    status_code = 415
    error_type = "invalid_request_error"


class UnprocessableError(ChatterboxError):
    status_code = 422
    error_type = "invalid_request_error"


class RequestTimeoutError(ChatterboxError):
    status_code = 408
    error_type = "timeout_error"


class RateLimitedError(ChatterboxError):
    status_code = 429
    error_type = "rate_limit_error"


class BodyLimitExceeded(StarletteHTTPException):
    """A request body passed its limit while it was being read (api/middleware.py: BodySizeLimit). Raised from
    inside the ASGI `receive`, so it is an HTTPException: FastAPI's body parsing passes those through unchanged
    (anything else it turns into a 400). Carries the PayloadTooLargeError that to_api_error reports."""

    def __init__(self, error: PayloadTooLargeError):
        super().__init__(status_code=error.status_code, detail=error.message)
        self.error = error


class ServiceUnavailableError(ChatterboxError):
    status_code = 503
    error_type = "service_unavailable_error"


class StageError(ChatterboxError):
    """A stage failed on a request (e.g. T3 finished with finish_reason='error')."""

    status_code = 500
    error_type = "internal_server_error"


@dataclass(frozen=True)
class ApiError:
    status_code: int
    body: ErrorResponse
    headers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return self.body.model_dump_json()

    def to_sse_event(self) -> bytes:
        """The `error` event that ends an SSE stream (FastAPI's SSE framing)."""
        return format_sse_event(data_str=ErrorEvent(error=self.body.error).model_dump_json())


def _error(status: int, message: str, error_type: str, *, param: str | None = None, code: str | int | None = None,
           retry_after_s: float | None = None) -> ApiError:
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(0, int(-(-retry_after_s // 1))))  # ceil, never negative
    return ApiError(status, ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code)),
                    headers)


def _unwrap(exc: BaseException) -> BaseException:
    """A stage's exception arrives as RayTaskError(cause); the cause is what we map."""
    if isinstance(exc, BodyLimitExceeded):
        return exc.error
    seen = 0
    while RayTaskError is not None and isinstance(exc, RayTaskError) and seen < 8:
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc, seen = cause, seen + 1
    return exc


def is_backpressure(exc: BaseException) -> bool:
    """A stage turned the call away before it started (its queue was full, also when the stage it called did):
    the same call can be made again later."""
    return BackPressureError is not None and isinstance(_unwrap(exc), BackPressureError)


def is_replica_lost(exc: BaseException) -> bool:
    """The stage replica a request ran on died or became unreachable (also when a stage saw it happen to the
    stage it called): nothing else went wrong, and the same request can run again on a live or restarted one."""
    return isinstance(_unwrap(exc), _REPLICA_LOST_ERRORS)


def _validation_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def to_api_error(exc: BaseException) -> ApiError:
    """The one mapping from any exception to (status, OpenAI-shaped body, headers)."""
    exc = _unwrap(exc)
    if isinstance(exc, ChatterboxError):
        return _error(exc.status_code, exc.message, exc.error_type, param=exc.param, code=exc.code,
                      retry_after_s=exc.retry_after_s if exc.status_code in (429, 503) else None)
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _validation_param(tuple(first.get("loc", ())))
        message = first.get("msg", "Invalid request.")
        if param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more validation error(s))"
        return _error(422, message, "invalid_request_error", param=param, code="validation_error")
    if BackPressureError is not None and isinstance(exc, BackPressureError):
        return _error(429, f"{exc.message} Retry later.", "rate_limit_error", code="backpressure",
                      retry_after_s=exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_RETRY_AFTER_S)
    if isinstance(exc, _UNAVAILABLE_RAY_ERRORS):
        # Ray's message goes on with the dead actor's id, pid and IP: the client gets its first line only
        message = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0][:200]
        logger.warning("a model stage is unavailable: %r", exc)
        return _error(503, f"A model stage is unavailable ({message}); retry shortly.", "service_unavailable_error",
                      code="stage_unavailable", retry_after_s=DEFAULT_RETRY_AFTER_S)
    if isinstance(exc, StarletteHTTPException):
        error_type = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        if exc.status_code >= 500:
            error_type = "internal_server_error"
        return ApiError(
            exc.status_code,
            ErrorResponse(error=ErrorInfo(message=str(exc.detail), type=error_type, code=exc.status_code)),
            dict(exc.headers or {}),
        )
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return _error(503, "Timed out waiting for a model stage.", "service_unavailable_error", code="timeout",
                      retry_after_s=DEFAULT_RETRY_AFTER_S)
    logger.error("Unhandled error: %r", exc, exc_info=exc)
    return _error(500, f"Internal server error ({type(exc).__name__}).", "internal_server_error")
