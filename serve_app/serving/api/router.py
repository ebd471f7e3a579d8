"""The speech service: OpenAI-compatible speech API logic over the T3, S3Gen and voice stages, without HTTP.

`SpeechRouter` returns data (wire models, `SpeechFile`, `SpeechStream`, async iterators of SSE event models) or
raises the typed errors of errors.py; it never builds a response. `api.app.build_app(router)` is the FastAPI app
whose thin routes call it and turn its results into `Response`, `StreamingResponse` and SSE frames (vLLM's
`serving` vs `api_router` split). Stage handles, settings, the watermarker and metrics come in through the
constructor, so tests pass fakes. A Ray Serve ingress (ingress.py) wraps both with the late-bound form of
`@serve.ingress` (Ray 2.60 calls `__serve_build_asgi_app__` on the replica after `__init__`):

    @serve.deployment
    @serve.ingress()
    class SpeechIngress:
        def __init__(self, t3, s3gen, voice, settings: dict):
            self.router = SpeechRouter(t3, s3gen, voice, settings)

        def __serve_build_asgi_app__(self):
            return build_app(self.router)
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from serve_app.contracts import BUILTIN_VOICE, SAMPLE_RATE, SynthesisParams, VoiceInfo
from serve_app.serving.audio import MEDIA_TYPES, change_speed, decode_upload, encode_audio, to_wav_bytes
from serve_app.serving.pipeline.chunking import chunk_text
from serve_app.serving.errors import (
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaError,
    VoiceNotFoundError,
    is_replica_lost,
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
T = TypeVar("T")


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
        self.pipeline = SpeechPipeline(self.s3gen, PipelineConfig(
            first_chunk_tokens=self.settings.first_chunk_tokens,
            stream_chunk_tokens=self.settings.stream_chunk_tokens,
            lookahead_chunks=self.settings.lookahead_chunks,
            first_chunks_first=self.settings.first_chunks_first,
            crossfade_samples=self.settings.crossfade_samples,
            max_seconds_per_char=self.settings.max_seconds_per_char,
        ))
        self.watermarker = default_watermarker(self.settings.watermark) if watermarker is _DEFAULT else watermarker
        self._metrics = metrics
        self._broken_metrics: set[str] = set()
        if self.settings.is_random_weights:
            logger.warning("Serving RANDOM weights (%s): audio is noise; every response says so (a header, "
                           "/v1/models)", self.settings.checkpoint_source)

    # -- metrics --------------------------------------------------------------------------------------------------

    @property
    def metrics(self) -> Any:
        if self._metrics is None:
            from serve_app.serving.metrics import get_metrics

            self._metrics = get_metrics()
        return self._metrics

    def record(self, name: str, method: str, value: float, **tags: str) -> None:
        if method == "inc" and value <= 0:
            return  # Ray counters refuse 0 (a stream that failed before any audio)
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
        chunks = chunk_text(req.input, self.settings.max_chunk_chars, multilingual=self.settings.multilingual,
                            language=req.language)
        if not chunks:
            raise InvalidRequestError("input has nothing to speak (blank, or only control characters); send some "
                                      "text.", param="input", code="empty_input")
        params = SynthesisParams(exaggeration=req.exaggeration, cfg_weight=req.cfg_weight,
                                 temperature=req.temperature, top_p=req.top_p, min_p=req.min_p,
                                 repetition_penalty=req.repetition_penalty, seed=req.seed, language=req.language,
                                 max_new_tokens=self.settings.max_new_tokens)
        return chunks, await self.resolve_voice(req.voice_name), params

    async def create_speech(self, req: SpeechRequest, request_id: str, started_at: float,
                            wait_for_disconnect: Callable[[], Awaitable[Any]] | None = None
                            ) -> SpeechFile | SpeechStream:
        """The request's audio: a whole file (`stream: false`) or a stream whose first piece is already made.

        Errors before any audio exists (bad input, unknown voice, 429 backpressure, 503 unavailable stage) are
        raised here, so they keep their HTTP status. `wait_for_disconnect` returns when the client has gone; the
        work is then cancelled and `ClientDisconnected` raised."""
        chunks, voice_id, params = await self.prepare(req)
        logger.info("%s: %d chars in %d chunk(s), voice=%s format=%s stream=%s", request_id, len(req.input),
                    len(chunks), voice_id, req.response_format, req.is_streaming)
        media_type = MEDIA_TYPES[req.response_format]

        async def start_stream() -> tuple[PipelineStats, AsyncIterator[bytes], bytes | None]:
            stats = PipelineStats()
            encoded = self._stream_encoded(req, request_id, chunks, voice_id, params, stats)
            return stats, encoded, await prime(encoded)   # prime closes the stream if it fails

        if req.is_streaming:
            work = self._retrying(request_id, start_stream)
        else:
            work = self._retrying(request_id, lambda: self._synthesize_file(req, request_id, chunks, voice_id, params))
        result = await (work if wait_for_disconnect is None else cancel_on_disconnect(work, wait_for_disconnect))
        ttfa = time.monotonic() - started_at
        self.record("time_to_first_audio_seconds", "observe", ttfa, route="speech", stream=str(req.is_streaming).lower())
        if not req.is_streaming:
            return SpeechFile(result, media_type)
        stats, encoded, first = result
        self._record_first_audio_phases(ttfa, stats.first_audio_timings)
        return SpeechStream(_prepend(first, encoded), media_type, len(req.input), stats)

    def _record_first_audio_phases(self, ttfa: float, timings: dict[str, float] | None) -> None:
        """The S3Gen replica's phases of the first chunk's first audio, and the rest of `ttfa` as `router`."""
        if not timings:
            return
        phases = {**timings, "router": max(0.0, ttfa - sum(timings.values()))}
        for phase, seconds in phases.items():
            self.record("first_audio_phase_seconds", "observe", seconds, phase=phase)
            self.record("first_audio_phase_seconds_total", "inc", seconds, phase=phase)   # the exact sum

    async def _retrying(self, request_id: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, run again (up to `max_stage_retries` times) when a stage replica died under it. Only work
        that has sent the client nothing comes here, so running it again is invisible but for the time."""
        retries = 0
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if retries >= self.settings.max_stage_retries or not is_replica_lost(exc):
                    raise
                retries += 1
                logger.warning("%s: a stage replica was lost before any audio was sent (%s); starting again "
                               "(retry %d of %d)", request_id, type(exc).__name__, retries,
                               self.settings.max_stage_retries)

    async def speech_events(self, stream: SpeechStream) -> AsyncIterator[SpeechAudioDeltaEvent | SpeechAudioDoneEvent]:
        """A stream's audio as OpenAI's SSE events: `speech.audio.delta` per piece, then `speech.audio.done`
        with usage. Errors are raised to the caller, which ends the SSE stream with an `error` event."""
        async for data in stream.chunks:
            yield SpeechAudioDeltaEvent(audio=base64.b64encode(data).decode())
        yield SpeechAudioDoneEvent(usage=stream.usage())

    async def _audio(self, request_id: str, chunks: list[str], voice_id: str, params: SynthesisParams, *,
                     streaming: bool, stats: PipelineStats | None = None) -> AsyncIterator[np.ndarray]:
        """The pipeline's audio pieces, each within `max_stall_s` of the one before: a stage that stalls (a bug,
        a lost message) ends the request with an error instead of holding its client forever."""
        pieces = self.pipeline.run(request_id, chunks, voice_id, params, streaming=streaming, stats=stats)
        limit = self.settings.max_stall_s or None
        try:
            while True:
                try:
                    async with asyncio.timeout(limit):   # in this task: a cancelled client still closes `pieces`
                        piece = await pieces.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    logger.error("%s: no audio from the stages for %.0f s; ending the request", request_id, limit)
                    raise ServiceUnavailableError(f"No audio came from the model stages for {limit:.0f} s; retry "
                                                  "shortly.", code="stage_stalled", retry_after_s=1) from None
                yield piece
        finally:
            await pieces.aclose()  # cancels stage calls still running (client gone, error, stall)

    async def _synthesize_file(self, req: SpeechRequest, request_id: str, chunks: list[str], voice_id: str,
                               params: SynthesisParams) -> bytes:
        pieces = [p async for p in self._audio(request_id, chunks, voice_id, params, streaming=False)]
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
        pieces = self._audio(request_id, chunks, voice_id, params, streaming=True, stats=stats)
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
            # a stream that ran to its end: did every piece come before a listener starting at the first needed it?
            self.record("streams_total", "inc", 1, stall_free=str(not stats.stalled).lower())
        finally:
            await pieces.aclose()  # cancels stage calls still running (client gone, error)
            out.encoder.close()
            self.record("audio_seconds_total", "inc", out.num_samples / SAMPLE_RATE, stage="router")


@dataclass
class SpeechFile:
    """A whole audio file in `media_type` (`stream: false`)."""

    audio: bytes
    media_type: str


@dataclass
class SpeechStream:
    """Encoded audio in `media_type`, made as `chunks` is consumed; closing `chunks` cancels the stage work."""

    chunks: AsyncIterator[bytes]
    media_type: str
    num_input_chars: int
    stats: PipelineStats

    def usage(self) -> SpeechUsage:
        """No text tokenizer runs in the router: input tokens are characters (see SpeechUsage)."""
        return SpeechUsage(input_tokens=self.num_input_chars, output_tokens=self.stats.num_speech_tokens,
                           total_tokens=self.num_input_chars + self.stats.num_speech_tokens)


async def _prepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for data in rest:
            yield data
    finally:
        await rest.aclose()


def _voice_object(info: VoiceInfo) -> VoiceObject:
    return VoiceObject(id=info.voice_id, name=info.name, created_at=info.created_at, duration_s=info.duration_s,
                       builtin=info.builtin)

