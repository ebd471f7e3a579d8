"""The speech router: OpenAI-compatible speech API logic over the T3, S3Gen and voice stages.

`SpeechRouter` is a plain class (no Ray decorators): stage handles, settings, the watermarker and metrics come in
through its constructor, so tests pass fakes. `api.build_app(router)` returns the FastAPI app whose thin routes
call it. A Ray Serve ingress wraps both with the late-bound form of `@serve.ingress` (Ray 2.60 calls
`__serve_build_asgi_app__` on the replica after `__init__`):

    from serve_app.serving.api.app import build_app
    from serve_app.serving.api.router import SpeechRouter

    @serve.deployment
    @serve.ingress()
    class SpeechIngress:
        def __init__(self, t3, s3gen, voice, settings: dict):
            self.router = SpeechRouter(t3, s3gen, voice, settings)

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
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi.responses import Response, StreamingResponse

from serve_app.contracts import BUILTIN_VOICE, SAMPLE_RATE, SynthesisParams, VoiceInfo
from serve_app.serving.audio import MEDIA_TYPES, change_speed, decode_upload, encode_audio, to_wav_bytes
from serve_app.serving.pipeline.chunking import chunk_text
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
from serve_app.serving.pipeline.pipeline import PipelineConfig, PipelineStats, SpeechPipeline
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
from serve_app.serving.stages.stage_client import StageClient
from serve_app.serving.pipeline.audio_out import (
    AudioOut,
    apply_watermark,
    cancel_on_disconnect,
    default_watermarker,
    prime,
)

logger = logging.getLogger(__name__)

_DEFAULT = object()
RANDOM_WEIGHTS_HEADER = "X-Chatterbox-Random-Weights"
MAX_JSON_BODY_BYTES = 1024 * 1024  # a 4096-character input with every knob is far below this
MULTIPART_OVERHEAD_BYTES = 64 * 1024
STATUS_CLIENT_CLOSED = 499  # nginx's convention for "client closed the request", used in logs and metrics


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
            max_seconds_per_char=self.settings.max_seconds_per_char,
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

    def check_body_size(self, route_name: str, content_length: str | None) -> None:
        """Rejects an oversized body from its Content-Length, before it is read."""
        try:
            declared = int(content_length or 0)
        except ValueError:
            raise InvalidRequestError("Content-Length is not a number.", code="bad_content_length") from None
        if route_name == "voices_create":
            limit = self.settings.max_voice_upload_bytes + MULTIPART_OVERHEAD_BYTES
            if declared > limit:
                raise PayloadTooLargeError(f"The upload is {declared} bytes; the limit is "
                                           f"{self.settings.max_voice_upload_bytes} bytes. Send a shorter clip.",
                                           param="file", code="file_too_large")
        elif declared > MAX_JSON_BODY_BYTES:
            raise PayloadTooLargeError(f"The request body is {declared} bytes; the limit is {MAX_JSON_BODY_BYTES}.",
                                       code="body_too_large")

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
            raise InvalidRequestError("input has nothing to speak (blank, or only control characters); send some "
                                      "text.", param="input", code="empty_input")
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
            body = await (synth if is_disconnected is None else cancel_on_disconnect(synth, is_disconnected))
            self.record("time_to_first_audio_seconds", "observe", time.monotonic() - started_at, route="speech",
                        stream="false")
            self.record_request("speech", 200, started_at, stream=False)
            return Response(body, media_type=MEDIA_TYPES[req.response_format],
                            headers=self._headers(request_id))
        # Streams are primed: the first audio is made before the response starts, so stage errors that come
        # first (backpressure 429, unavailable 503, unknown voice in a stage) still get their HTTP status.
        stats = PipelineStats()
        encoded = self._stream_encoded(req, request_id, chunks, voice_id, params, stats)
        primed = prime(encoded)
        first = await (primed if is_disconnected is None else cancel_on_disconnect(primed, is_disconnected))
        self.record("time_to_first_audio_seconds", "observe", time.monotonic() - started_at, route="speech",
                    stream="true")
        if req.stream_format == "sse":
            return StreamingResponse(self._stream_sse(first, encoded, req, request_id, stats, started_at),
                                     media_type="text/event-stream",
                                     headers={**self._headers(request_id), "Cache-Control": "no-cache"})
        return StreamingResponse(self._stream_audio(first, encoded, request_id, started_at),
                                 media_type=MEDIA_TYPES[req.response_format],
                                 headers=self._headers(request_id))

    async def _synthesize_file(self, req: SpeechRequest, request_id: str, chunks: list[str], voice_id: str,
                               params: SynthesisParams) -> bytes:
        pieces = [p async for p in self.pipeline.run(request_id, chunks, voice_id, params, streaming=False)]
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return await asyncio.to_thread(self._finish_file, audio, req.speed, req.response_format)

    def _finish_file(self, audio: np.ndarray, speed: float, fmt: str) -> bytes:
        audio = change_speed(audio, speed)
        if self.watermarker is not None:
            audio = apply_watermark(self.watermarker, audio)
        self.record("audio_seconds_total", "inc", audio.size / SAMPLE_RATE, stage="router")
        return encode_audio(audio, fmt)

    async def _stream_encoded(self, req: SpeechRequest, request_id: str, chunks: list[str], voice_id: str,
                              params: SynthesisParams, stats: PipelineStats) -> AsyncIterator[bytes]:
        out = AudioOut(req.response_format, req.speed, self.watermarker)
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


def _voice_object(info: VoiceInfo) -> VoiceObject:
    return VoiceObject(id=info.voice_id, name=info.name, created_at=info.created_at, duration_s=info.duration_s,
                       builtin=info.builtin)

