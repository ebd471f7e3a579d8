"""The HTTP-facing router: OpenAI-compatible speech API over the T3, S3Gen and voice stages.

`SpeechRouter` is a plain class (no Ray decorators): stage handles, settings, the watermarker and metrics come in
through its constructor, so tests pass fakes. `build_app(router)` returns the FastAPI app whose thin routes call
it. A Ray Serve ingress wraps both with the late-bound form of `@serve.ingress`:

    @serve.deployment
    @serve.ingress()
    class SpeechIngress:
        def __init__(self, t3, s3gen, voice, settings: dict):
            self.router = SpeechRouter(t3, s3gen, voice, RouterSettings(**settings))

        def __serve_build_asgi_app__(self):
            return build_app(self.router)

Endpoints: POST /v1/audio/speech, GET /v1/models[/{id}], POST|GET /v1/voices, DELETE /v1/voices/{id},
GET /healthz, /readyz, /v1/config, /v1/memory. Every error body is `ErrorResponse` (errors.to_api_error).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.serving.audio import AudioEncoder, TimeStretcher, change_speed, decode_upload, encode_audio, to_wav_bytes
from serve_app.serving.chunking import chunk_text
from serve_app.serving.contracts import BUILTIN_VOICE, SAMPLE_RATE, SynthesisParams, VoiceInfo
from serve_app.serving.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaError,
    VoiceNotFoundError,
    to_api_error,
)
from serve_app.serving.pipeline import PipelineConfig, PipelineStats, SpeechPipeline
from serve_app.serving.protocol import (
    OPENAI_TTS_MODEL_NAMES,
    OPENAI_VOICE_NAMES,
    HealthResponse,
    MemoryReport,
    ModelCard,
    ModelList,
    SpeechAudioDeltaEvent,
    SpeechAudioDoneEvent,
    SpeechRequest,
    SpeechUsage,
    VoiceDeleted,
    VoiceList,
    VoiceObject,
)
from serve_app.serving.router_settings import RouterSettings
from serve_app.serving.stage_client import StageClient

logger = logging.getLogger(__name__)

Watermarker = Callable[[np.ndarray], np.ndarray]  # float32 [N] at 24 kHz -> float32 [N]
_DEFAULT = object()
WATERMARK_BLOCK_SAMPLES = SAMPLE_RATE // 2  # streamed audio is watermarked in blocks of >= 0.5 s
RANDOM_WEIGHTS_HEADER = "X-Chatterbox-Random-Weights"
STATUS_CLIENT_CLOSED = 499  # nginx's convention for "client closed the request", used in logs and metrics


class ClientDisconnected(Exception):
    pass


def default_watermarker(enabled: bool) -> Watermarker | None:
    """Perth, as upstream applies it; None when disabled. Importing perth pulls in torch: only when enabled."""
    if not enabled:
        return None
    from serve_app.serving.watermark import Watermarker as PerthWatermarker

    return PerthWatermarker(enabled=True, sample_rate=SAMPLE_RATE).apply


def _apply_watermark(watermarker: Watermarker, audio: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """Watermarks `audio`; a piece too short for Perth's STFT is marked together with the audio before it."""
    if audio.size == 0:
        return audio
    if audio.size < WATERMARK_BLOCK_SAMPLES and context is not None and context.size:
        return watermarker(np.concatenate([context, audio]))[-audio.size:]
    try:
        return watermarker(audio)
    except Exception:  # noqa: BLE001 - only a clip shorter than Perth's window gets here
        logger.warning("audio of %d samples too short to watermark; sent unmarked", audio.size, exc_info=True)
        return audio


class _AudioOut:
    """Pipeline audio -> tempo change -> watermark -> encoded bytes, piece by piece."""

    def __init__(self, fmt: str, speed: float, watermarker: Watermarker | None):
        self.stretcher = TimeStretcher(speed)
        self.encoder = AudioEncoder(fmt, streaming=True)
        self.watermarker = watermarker
        self._pending = np.zeros(0, np.float32)
        self._context = np.zeros(0, np.float32)  # the last unmarked samples already sent, for a short tail
        self.num_samples = 0

    def _encode(self, samples: np.ndarray, final: bool) -> bytes:
        if self.watermarker is not None:
            self._pending = np.concatenate([self._pending, samples])
            if self._pending.size < WATERMARK_BLOCK_SAMPLES and not final:
                return b""
            raw, self._pending = self._pending, np.zeros(0, np.float32)
            samples = _apply_watermark(self.watermarker, raw, self._context)
            self._context = np.concatenate([self._context, raw])[-WATERMARK_BLOCK_SAMPLES:]
        self.num_samples += samples.size
        return self.encoder.encode(samples)

    def push(self, samples: np.ndarray) -> bytes:
        return self._encode(self.stretcher.push(samples), final=False)

    def finish(self) -> bytes:
        return self._encode(self.stretcher.flush(), final=True) + self.encoder.finish()


class SpeechRouter:
    def __init__(self, t3_handle: Any, s3gen_handle: Any, voice_handle: Any,
                 settings: RouterSettings | dict | None = None, *, watermarker: Any = _DEFAULT,
                 metrics: Any = None, **overrides: Any):
        """Handles: Ray DeploymentHandles or fakes with the methods of contracts.py plus `memory_report()`.
        settings: a RouterSettings or its fields as a dict; `overrides` (RouterSettings fields) win over it.
        watermarker: float32 audio -> float32 audio, None for none; default: Perth when settings.watermark.
        metrics: an object with serve_app.serving.metrics.Metrics' attributes; default: get_metrics()."""
        if isinstance(settings, RouterSettings):
            settings = settings.model_dump()
        self.settings = RouterSettings(**{**(settings or {}), **overrides})
        self.t3 = StageClient(t3_handle, "t3")
        self.s3gen = StageClient(s3gen_handle, "s3gen")
        self.voices = StageClient(voice_handle, "voice")
        self.pipeline = SpeechPipeline(self.t3, self.s3gen, PipelineConfig(
            first_chunk_tokens=self.settings.first_chunk_tokens,
            stream_chunk_tokens=self.settings.stream_chunk_tokens,
            lookahead_chunks=self.settings.lookahead_chunks,
            crossfade_samples=self.settings.crossfade_samples,
        ))
        self.watermarker = default_watermarker(self.settings.watermark) if watermarker is _DEFAULT else watermarker
        self._metrics = metrics
        self._broken_metrics: set[str] = set()
        if self.settings.is_random_weights:
            logger.warning("Serving RANDOM weights (%s): audio is noise; responses carry %s: true",
                           self.settings.checkpoint_source, RANDOM_WEIGHTS_HEADER)

    # -- metrics --------------------------------------------------------------------------------------------------

    @property
    def metrics(self) -> Any:
        if self._metrics is None:
            from serve_app.serving.metrics import get_metrics

            self._metrics = get_metrics()
        return self._metrics

    def record(self, name: str, method: str, value: float, **tags: str) -> None:
        try:
            getattr(getattr(self.metrics, name), method)(value, tags=tags)
        except Exception:  # noqa: BLE001 - metrics never fail a request, but a broken one is reported once
            if name not in self._broken_metrics:
                self._broken_metrics.add(name)
                logger.warning("metric %s could not be recorded", name, exc_info=True)

    def record_request(self, route: str, status: int, started_at: float, stream: bool | None = None) -> None:
        self.record("requests_total", "inc", 1, route=route, status=str(status))
        if stream is not None:
            self.record("request_duration_seconds", "observe", time.monotonic() - started_at, route=route,
                        stream=str(stream).lower(), status=str(status))

    # -- auth -----------------------------------------------------------------------------------------------------

    def check_api_key(self, authorization: str | None) -> None:
        if not self.settings.api_keys:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.settings.api_keys):
            raise AuthenticationError("Incorrect API key.", code="invalid_api_key")

    # -- models, config, health -----------------------------------------------------------------------------------

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.settings.model_name, random_weights=self.settings.is_random_weights,
                         checkpoint=self.settings.checkpoint_source)

    def list_models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def get_model(self, model_id: str) -> ModelCard:
        if model_id != self.settings.model_name:
            raise NotFoundError(f"Model '{model_id}' does not exist; this server serves '{self.settings.model_name}'.",
                                param="model", code="model_not_found")
        return self.model_card()

    def config(self) -> dict:
        return self.settings.public_dict()

    async def _probe(self) -> dict[str, Any]:
        """Each stage's memory_report(), or the exception it raised, keyed by stage name."""
        clients = (self.t3, self.s3gen, self.voices)
        results = await asyncio.gather(
            *(c.call("memory_report", timeout_s=self.settings.probe_timeout_s) for c in clients),
            return_exceptions=True)
        return {c.name: r for c, r in zip(clients, results)}

    async def ready(self) -> HealthResponse:
        results = await self._probe()
        failed = {name: r for name, r in results.items() if isinstance(r, BaseException)}
        if failed:
            detail = "; ".join(f"{name}: {type(r).__name__}: {r}" for name, r in failed.items())
            raise ServiceUnavailableError(f"Not ready: {detail}", code="not_ready", retry_after_s=5)
        return HealthResponse(status="ready", stages={name: "ok" for name in results})

    async def memory(self) -> MemoryReport:
        results = await self._probe()
        return MemoryReport(stages={
            name: ({"error": f"{type(r).__name__}: {r}"} if isinstance(r, BaseException) else dict(r or {}))
            for name, r in results.items()})

    # -- voices ---------------------------------------------------------------------------------------------------

    async def list_voice_infos(self) -> list[VoiceInfo]:
        return list(await self.voices.call("list_voices"))

    async def list_voices(self) -> VoiceList:
        return VoiceList(data=[_voice_object(v) for v in await self.list_voice_infos()])

    async def resolve_voice(self, voice: str) -> str:
        """'default' and OpenAI voice names -> the built-in voice (an enrolled voice with that id wins)."""
        if voice == BUILTIN_VOICE:
            return BUILTIN_VOICE
        ids = {v.voice_id for v in await self.list_voice_infos()}
        if voice in ids:
            return voice
        if voice in OPENAI_VOICE_NAMES:
            return BUILTIN_VOICE
        raise VoiceNotFoundError(f"Voice '{voice}' not found. Use 'default', an OpenAI voice name, or an id from "
                                 "GET /v1/voices (enroll one with POST /v1/voices).")

    async def enroll_voice(self, data: bytes, content_type: str | None, name: str | None) -> VoiceObject:
        limit = self.settings.max_voice_upload_bytes
        if len(data) > limit:
            raise PayloadTooLargeError(f"The voice file is {len(data)} bytes; the limit is {limit} bytes. Send a "
                                       "shorter clip.", param="file", code="file_too_large")
        if content_type and not content_type.startswith(("audio/", "video/", "application/octet-stream")):
            raise UnsupportedMediaError(f"Unsupported media type '{content_type}'; send audio (wav, mp3, flac, ogg, "
                                        "m4a).", param="file", code="unsupported_media")
        samples, sample_rate = await asyncio.to_thread(decode_upload, data)
        duration = samples.size / sample_rate
        lo, hi = self.settings.min_voice_duration_s, self.settings.max_voice_duration_s
        if not lo <= duration <= hi:
            raise InvalidRequestError(f"The voice clip is {duration:.1f} s long; send {lo:g} to {hi:g} s of clean "
                                      "speech.", param="file",
                                      code="audio_too_short" if duration < lo else "audio_too_long")
        info = await self.voices.call("enroll", to_wav_bytes(samples, sample_rate), name)
        return _voice_object(info)

    async def delete_voice(self, voice_id: str) -> VoiceDeleted:
        infos = {v.voice_id: v for v in await self.list_voice_infos()}
        if voice_id == BUILTIN_VOICE or (voice_id in infos and infos[voice_id].builtin):
            raise InvalidRequestError(f"'{voice_id}' is the built-in voice and cannot be deleted.", param="voice_id",
                                      code="builtin_voice")
        if voice_id not in infos:
            raise VoiceNotFoundError(f"Voice '{voice_id}' not found.", param="voice_id")
        await self.voices.call("delete", voice_id)
        return VoiceDeleted(id=voice_id)

    # -- speech ---------------------------------------------------------------------------------------------------

    async def prepare(self, req: SpeechRequest) -> tuple[list[str], str, SynthesisParams]:
        """Validates what pydantic cannot and resolves the voice: (text chunks, voice id, params)."""
        if req.extra_field_names():
            logger.info("ignoring unknown speech request fields: %s", ", ".join(req.extra_field_names()))
        if req.model not in (None, self.settings.model_name) and req.model not in OPENAI_TTS_MODEL_NAMES:
            raise NotFoundError(f"Model '{req.model}' does not exist; use '{self.settings.model_name}'.",
                                param="model", code="model_not_found")
        if len(req.input) > self.settings.max_input_chars:
            raise InvalidRequestError(f"input is {len(req.input)} characters; the limit is "
                                      f"{self.settings.max_input_chars}. Split the text into several requests.",
                                      param="input", code="input_too_long")
        if req.language and not self.settings.multilingual:
            raise InvalidRequestError("language is only accepted by a multilingual checkpoint; drop it or serve "
                                      "the multilingual model.", param="language", code="unsupported_language")
        chunks = chunk_text(req.input, self.settings.max_chunk_chars)
        if not chunks:
            raise InvalidRequestError("input is blank; send some text to speak.", param="input", code="empty_input")
        params = SynthesisParams(exaggeration=req.exaggeration, cfg_weight=req.cfg_weight,
                                 temperature=req.temperature, top_p=req.top_p, min_p=req.min_p,
                                 repetition_penalty=req.repetition_penalty, seed=req.seed, language=req.language,
                                 max_new_tokens=self.settings.max_new_tokens)
        return chunks, await self.resolve_voice(req.voice_name), params

    def _headers(self, request_id: str) -> dict[str, str]:
        headers = {"X-Request-Id": request_id}
        if self.settings.is_random_weights:
            headers[RANDOM_WEIGHTS_HEADER] = "true"
        return headers

    async def create_speech(self, req: SpeechRequest, request_id: str, started_at: float,
                            is_disconnected: Callable[[], Any] | None = None) -> Response:
        chunks, voice_id, params = await self.prepare(req)
        logger.info("%s: %d chars in %d chunk(s), voice=%s format=%s stream=%s", request_id, len(req.input),
                    len(chunks), voice_id, req.response_format, req.is_streaming)
        if not req.is_streaming:
            synth = self._synthesize_file(req, request_id, chunks, voice_id, params)
            body = await (synth if is_disconnected is None else _cancel_on_disconnect(synth, is_disconnected))
            self.record("time_to_first_audio_seconds", "observe", time.monotonic() - started_at, route="speech",
                        stream="false")
            self.record_request("speech", 200, started_at, stream=False)
            return Response(body, media_type=AudioEncoder(req.response_format).media_type,
                            headers=self._headers(request_id))
        # Streams are primed: the first audio is made before the response starts, so stage errors that come
        # first (backpressure 429, unavailable 503, unknown voice in a stage) still get their HTTP status.
        stats = PipelineStats()
        encoded = self._stream_encoded(req, request_id, chunks, voice_id, params, stats)
        primed = _prime(encoded)
        first = await (primed if is_disconnected is None else _cancel_on_disconnect(primed, is_disconnected))
        self.record("time_to_first_audio_seconds", "observe", time.monotonic() - started_at, route="speech",
                    stream="true")
        if req.stream_format == "sse":
            return StreamingResponse(self._stream_sse(first, encoded, req, request_id, stats, started_at),
                                     media_type="text/event-stream",
                                     headers={**self._headers(request_id), "Cache-Control": "no-cache"})
        return StreamingResponse(self._stream_audio(first, encoded, request_id, started_at),
                                 media_type=AudioEncoder(req.response_format).media_type,
                                 headers=self._headers(request_id))

    async def _synthesize_file(self, req: SpeechRequest, request_id: str, chunks: list[str], voice_id: str,
                               params: SynthesisParams) -> bytes:
        pieces = [p async for p in self.pipeline.run(request_id, chunks, voice_id, params, streaming=False)]
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return await asyncio.to_thread(self._finish_file, audio, req.speed, req.response_format)

    def _finish_file(self, audio: np.ndarray, speed: float, fmt: str) -> bytes:
        audio = change_speed(audio, speed)
        if self.watermarker is not None:
            audio = _apply_watermark(self.watermarker, audio)
        self.record("audio_seconds_total", "inc", audio.size / SAMPLE_RATE, stage="router")
        return encode_audio(audio, fmt)

    async def _stream_encoded(self, req: SpeechRequest, request_id: str, chunks: list[str], voice_id: str,
                              params: SynthesisParams, stats: PipelineStats) -> AsyncIterator[bytes]:
        out = _AudioOut(req.response_format, req.speed, self.watermarker)
        pieces = self.pipeline.run(request_id, chunks, voice_id, params, streaming=True, stats=stats)
        # Perth runs torch on the CPU: keep it (and the encoder with it) off the event loop.
        offload = self.watermarker is not None
        try:
            async for piece in pieces:
                data = await asyncio.to_thread(out.push, piece) if offload else out.push(piece)
                if data:
                    yield data
            data = await asyncio.to_thread(out.finish) if offload else out.finish()
            if data:
                yield data
        finally:
            await pieces.aclose()  # cancels T3 streams still running (client gone, error)
            out.encoder.close()
            self.record("audio_seconds_total", "inc", out.num_samples / SAMPLE_RATE, stage="router")

    async def _stream_audio(self, first: bytes | None, rest: AsyncIterator[bytes], request_id: str,
                            started_at: float) -> AsyncIterator[bytes]:
        status = 200
        try:
            if first:
                yield first
            async for data in rest:
                yield data
        except asyncio.CancelledError:
            status = STATUS_CLIENT_CLOSED
            logger.info("%s: client disconnected; cancelled", request_id)
            raise
        except Exception as exc:  # headers are sent: a raw audio stream can only end early
            status = to_api_error(exc).status_code
            logger.error("%s: audio stream ended by error %d: %s", request_id, status, exc)
        finally:
            await rest.aclose()
            self.record_request("speech", status, started_at, stream=True)

    async def _stream_sse(self, first: bytes | None, rest: AsyncIterator[bytes], req: SpeechRequest,
                          request_id: str, stats: PipelineStats, started_at: float) -> AsyncIterator[str]:
        status = 200
        try:
            if first:
                yield _delta_event(first)
            async for data in rest:
                yield _delta_event(data)
            usage = SpeechUsage(input_tokens=len(req.input), output_tokens=stats.num_speech_tokens,
                                total_tokens=len(req.input) + stats.num_speech_tokens)
            yield f"data: {SpeechAudioDoneEvent(usage=usage).model_dump_json()}\n\n"
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
            await rest.aclose()
            self.record_request("speech", status, started_at, stream=True)


def _delta_event(data: bytes) -> str:
    return f"data: {SpeechAudioDeltaEvent(audio=base64.b64encode(data).decode()).model_dump_json()}\n\n"


async def _prime(stream: AsyncIterator[bytes]) -> bytes | None:
    """The stream's first item (None when it is empty); on failure the stream is closed and the error raised."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await stream.aclose()
        raise


def _voice_object(info: VoiceInfo) -> VoiceObject:
    return VoiceObject(id=info.voice_id, name=info.name, created_at=info.created_at, duration_s=info.duration_s,
                       builtin=info.builtin)


async def _cancel_on_disconnect(coro, is_disconnected: Callable[[], Any]):
    """Runs `coro`; if the client goes away first, cancels it (and with it every stage call) and raises."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(is_disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected()
    finally:
        for task in (work, watcher):
            if not task.done():
                task.cancel()


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
    async def create_voice(request: Request, file: UploadFile = File(...), name: str | None = Form(None)) -> VoiceObject:
        declared = int(request.headers.get("content-length") or 0)
        if declared > router.settings.max_voice_upload_bytes + 64 * 1024:  # multipart overhead allowance
            raise PayloadTooLargeError(f"The upload is {declared} bytes; the limit is "
                                       f"{router.settings.max_voice_upload_bytes} bytes.", param="file",
                                       code="file_too_large")
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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc)  # unknown route (404), wrong method (405)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(exc)

    return app
