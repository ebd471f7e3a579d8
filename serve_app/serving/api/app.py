"""The FastAPI app over a `SpeechRouter`: thin routes that turn the router's data into HTTP responses, one route
class (request ids, the one error mapping, request counting) and the middlewares of middleware.py. A Ray Serve
ingress wraps it with the late-bound form of `@serve.ingress` (see ingress.py).

Speech responses, by what the router returns:
- `SpeechFile` (`stream: false`): the whole file with a Content-Length.
- `SpeechStream`, `stream_format: audio` (the default, as OpenAI): chunked transfer encoding. The first bytes
  exist before the status line is sent, so errors before any audio keep their status. An error after it cannot
  change the status: the body is cut off without its final chunk, so the client sees an incomplete body, never
  a short file that looks complete.
- `SpeechStream`, `stream_format: sse`: `speech.audio.delta` events then `speech.audio.done`; an error ends the
  stream with an `error` event carrying the same object as an error body.
A client that disconnects cancels the request's stage work at any point.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.serving.api.middleware import ApiKeyAuth, BodySizeLimit, SpeechAdmission, error_response
from serve_app.serving.api.router import SpeechFile, SpeechRouter, SpeechStream
from serve_app.serving.errors import to_api_error
from serve_app.serving.pipeline.audio_out import ClientDisconnected
from serve_app.serving.protocol import (
    ErrorResponse,
    HealthResponse,
    MemoryReport,
    ModelCard,
    ModelList,
    SpeechRequest,
    VoiceDeleted,
    VoiceList,
    VoiceObject,
)

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_HEADER = "X-Chatterbox-Random-Weights"
STATUS_CLIENT_CLOSED = 499  # nginx's convention for "client closed the request", used in logs and metrics

SPEECH_DESCRIPTION = """Text to speech, as OpenAI's `POST /v1/audio/speech`.

**Streams by default**, as OpenAI does: the audio is sent with chunked transfer encoding as it is made, in every
`response_format` (wav declares an unknown length in its header; pcm is raw 24 kHz 16-bit mono). A client reading
the body gets the first bytes when the first audio exists. `"stream": false` opts out: the whole file is made
first and sent with a Content-Length. `"stream_format": "sse"` sends `speech.audio.delta` events with base64
audio, then `speech.audio.done` with usage.

Errors before the first audio get their HTTP status and an OpenAI-shaped body (`{"error": {...}}`). A failure
after audio was sent ends an SSE stream with an `error` event and cuts an audio stream off without its final
chunk (clients report an incomplete body). Chatterbox's own knobs (`exaggeration`, `cfg_weight`, `seed`, ...)
go in the same JSON body (`extra_body` in the openai SDK)."""


class StreamInterrupted(Exception):
    """An audio stream failed after its first bytes; raised to cut the response off without its last chunk."""


def _wait_for_disconnect(request: Request) -> Callable[[], Any]:
    """After the body is read, the next ASGI message is http.disconnect (vLLM's listen_for_disconnect)."""
    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    return wait


def _route_class(router: SpeechRouter) -> type[APIRoute]:
    class ApiRoute(APIRoute):
        """Every route: request id, errors through the one mapping, request counting, the random-weights header."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            route_name = self.name

            async def wrapped(request: Request) -> Response:
                request_id = request.headers.get("x-request-id") or f"speech-{uuid.uuid4().hex}"
                request.state.request_id = request_id
                request.state.started_at = time.monotonic()
                try:
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


# -- speech responses ---------------------------------------------------------------------------------------------

def speech_response(router: SpeechRouter, result: SpeechFile | SpeechStream, req: SpeechRequest, request_id: str,
                    started_at: float) -> Response:
    if isinstance(result, SpeechFile):
        router.record_request("speech", 200, started_at, stream=False)
        return Response(result.audio, media_type=result.media_type)
    if req.stream_format == "sse":
        return EventSourceResponse(_sse_body(router, result, request_id, started_at),
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return StreamingResponse(_audio_body(router, result, request_id, started_at), media_type=result.media_type)


async def _audio_body(router: SpeechRouter, stream: SpeechStream, request_id: str,
                      started_at: float) -> AsyncIterator[bytes]:
    status = 200
    num_bytes = 0
    try:
        async for data in stream.chunks:
            num_bytes += len(data)
            yield data
    except asyncio.CancelledError:
        status = STATUS_CLIENT_CLOSED
        logger.info("%s: client disconnected; cancelled", request_id)
        raise
    except Exception as exc:  # headers are sent: the status cannot change, so the body is cut off
        api_error = to_api_error(exc)
        status = api_error.status_code
        logger.error("%s: audio stream failed after %d bytes (%d %s): %s", request_id, num_bytes, status,
                     api_error.body.error.code, api_error.body.error.message)
        raise StreamInterrupted(f"{request_id}: audio stream failed after {num_bytes} bytes") from exc
    finally:
        await stream.chunks.aclose()
        router.record_request("speech", status, started_at, stream=True)


async def _sse_body(router: SpeechRouter, stream: SpeechStream, request_id: str,
                    started_at: float) -> AsyncIterator[bytes]:
    status = 200
    try:
        async for event in router.speech_events(stream):
            yield format_sse_event(data_str=event.model_dump_json())
    except asyncio.CancelledError:
        status = STATUS_CLIENT_CLOSED
        logger.info("%s: client disconnected; cancelled", request_id)
        raise
    except Exception as exc:  # the stream ends with the same error object as a JSON error body
        api_error = to_api_error(exc)
        status = api_error.status_code
        logger.error("%s: SSE stream ended by error %d: %s", request_id, status, exc)
        yield api_error.to_sse_event()
    finally:
        await stream.chunks.aclose()
        router.record_request("speech", status, started_at, stream=True)


# -- the app ------------------------------------------------------------------------------------------------------

def build_app(router: SpeechRouter) -> FastAPI:
    """The FastAPI app over `router`. Routes are thin: parse, call the router, turn its result into a response."""
    app = FastAPI(title="Chatterbox TTS", version="0.1.0",
                  description="OpenAI-compatible text-to-speech served by Chatterbox on Ray Serve. Speech streams "
                  "by default (chunked transfer encoding), as OpenAI's does; `stream: false` returns a whole file. "
                  "With API keys configured, every route but /healthz and /readyz needs `Authorization: Bearer "
                  "<key>`. Every error is `{\"error\": {message, type, param, code}}`.")
    api = APIRouter(route_class=_route_class(router), responses={"default": {
        "model": ErrorResponse, "description": "Any error, with its HTTP status: `{\"error\": {message, type, param, "
        "code}}` as OpenAI's (a 429 or 503 also has Retry-After)."}})

    @api.post("/v1/audio/speech", name="speech", response_class=Response, description=SPEECH_DESCRIPTION,
              responses={200: {"content": {"audio/mpeg": {}, "audio/ogg": {}, "audio/aac": {}, "audio/flac": {},
                                           "audio/wav": {}, "audio/pcm": {}, "text/event-stream": {}},
                               "description": "The audio (streamed unless `stream: false`), or SSE events."}})
    async def create_speech(body: SpeechRequest, request: Request) -> Response:
        state = request.state
        result = await router.create_speech(body, state.request_id, state.started_at, _wait_for_disconnect(request))
        return speech_response(router, result, body, state.request_id, state.started_at)

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
    # Middlewares, outermost first (add_middleware puts each new one outside the ones added before it):
    #   ApiKeyAuth (anonymous requests read no body) -> BodySizeLimit (bytes that arrive) -> SpeechAdmission
    #   (speech slots) -> routes.
    app.add_middleware(SpeechAdmission, router=router)
    app.add_middleware(BodySizeLimit, router=router)
    app.add_middleware(ApiKeyAuth, router=router)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc)  # unknown route (404), wrong method (405)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(exc)

    return app
