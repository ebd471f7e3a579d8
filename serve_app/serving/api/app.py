"""The FastAPI app over a `SpeechRouter`: thin routes, one route class that adds request ids, Bearer auth on
/v1/*, request counting and the one error mapping to every route. A Ray Serve ingress wraps it with the
late-bound form of `@serve.ingress` (see router.py).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.serving.errors import RateLimitedError, to_api_error
from serve_app.serving.protocol import (
    HealthResponse,
    MemoryReport,
    ModelCard,
    ModelList,
    SpeechRequest,
    VoiceDeleted,
    VoiceList,
    VoiceObject,
)
from serve_app.serving.api.router import RANDOM_WEIGHTS_HEADER, STATUS_CLIENT_CLOSED, SpeechRouter
from serve_app.serving.pipeline.audio_out import ClientDisconnected


def _wait_for_disconnect(request: Request) -> Callable[[], Any]:
    """After the body is read, the next ASGI message is http.disconnect (vLLM's listen_for_disconnect)."""
    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    return wait


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    api_error = to_api_error(exc)
    headers = dict(api_error.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse(api_error.body.model_dump(), status_code=api_error.status_code, headers=headers)


class SpeechAdmission:
    """ASGI middleware: at most `max_active_speech_requests` speech requests run in a router replica at once
    (streams count until their last byte); the next one gets an OpenAI-shaped 429 at once. Keep the cap below the
    deployment's Ray `max_ongoing_requests`: requests past that wait in Ray's proxy, and past its
    `max_queued_requests` the proxy answers a plain-text 503 that this app never sees."""

    def __init__(self, app: Any, router: SpeechRouter) -> None:
        self.app = app
        self.router = router
        self.active = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/audio/speech":
            await self.app(scope, receive, send)
            return
        cap = self.router.settings.max_active_speech_requests
        if self.active >= cap:
            exc = RateLimitedError(f"This server is running its maximum of {cap} speech requests; retry shortly.",
                                   code="server_busy", retry_after_s=1.0)
            self.router.record_request("speech", exc.status_code, time.monotonic(), stream=False)
            await error_response(exc)(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _route_class(router: SpeechRouter) -> type[APIRoute]:
    class ApiRoute(APIRoute):
        """Every route: request id, Bearer auth on /v1/*, errors through the one mapping, request counting."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            path = self.path
            route_name = self.name

            async def wrapped(request: Request) -> Response:
                request_id = request.headers.get("x-request-id") or f"speech-{uuid.uuid4().hex}"
                request.state.request_id = request_id
                request.state.started_at = time.monotonic()
                try:
                    if path.startswith("/v1/"):
                        router.check_api_key(request.headers.get("authorization"))
                    # before FastAPI reads (and spools) the body
                    router.check_body_size(route_name, request.headers.get("content-length"))
                    response = await handler(request)
                except ClientDisconnected:
                    router.record_request(route_name, STATUS_CLIENT_CLOSED, request.state.started_at, stream=False)
                    return Response(status_code=STATUS_CLIENT_CLOSED)
                except Exception as exc:  # noqa: BLE001 - the one error mapping decides
                    response = error_response(exc, request_id)
                    if route_name == "speech":
                        router.record_request("speech", response.status_code, request.state.started_at, stream=False)
                response.headers.setdefault("X-Request-Id", request_id)
                if router.settings.is_random_weights:
                    response.headers.setdefault(RANDOM_WEIGHTS_HEADER, "true")
                if route_name != "speech":
                    router.record_request(route_name, response.status_code, request.state.started_at)
                return response

            return wrapped

    return ApiRoute


def build_app(router: SpeechRouter) -> FastAPI:
    """The FastAPI app over `router`. Routes are thin: parse, call the router, return its model."""
    app = FastAPI(title="Chatterbox TTS", version="0.1.0",
                  description="OpenAI-compatible text-to-speech served by Chatterbox on Ray Serve.")
    api = APIRouter(route_class=_route_class(router))

    @api.post("/v1/audio/speech", name="speech", response_class=Response,
              responses={200: {"content": {"audio/mpeg": {}, "text/event-stream": {}}}})
    async def create_speech(body: SpeechRequest, request: Request) -> Response:
        return await router.create_speech(body, request.state.request_id, request.state.started_at,
                                          _wait_for_disconnect(request))

    @api.get("/v1/models", name="models")
    async def list_models() -> ModelList:
        return router.list_models()

    @api.get("/v1/models/{model_id}", name="model")
    async def get_model(model_id: str) -> ModelCard:
        return router.get_model(model_id)

    @api.post("/v1/voices", name="voices_create")
    async def create_voice(file: UploadFile = File(...), name: str | None = Form(None)) -> VoiceObject:
        data = await file.read(router.settings.max_voice_upload_bytes + 1)
        return await router.enroll_voice(data, file.content_type, name)

    @api.get("/v1/voices", name="voices_list")
    async def list_voices() -> VoiceList:
        return await router.list_voices()

    @api.delete("/v1/voices/{voice_id}", name="voices_delete")
    async def delete_voice(voice_id: str) -> VoiceDeleted:
        return await router.delete_voice(voice_id)

    @api.get("/v1/config", name="config")
    async def get_config() -> dict:
        return router.config()

    @api.get("/v1/memory", name="memory")
    async def get_memory() -> MemoryReport:
        return await router.memory()

    @api.get("/healthz", name="healthz")
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @api.get("/readyz", name="readyz")
    async def readyz() -> HealthResponse:
        return await router.ready()

    app.include_router(api)
    app.add_middleware(SpeechAdmission, router=router)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc)  # unknown route (404), wrong method (405)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(exc)

    return app
