"""The speech pipeline of one request: text chunks -> T3 token streams -> S3Gen audio -> joined audio pieces.

    chunk 0:  T3 ──tokens──> S3Gen ──audio──┐
    chunk 1:      T3 (runs ahead while chunk 0 is vocoded) ──> S3Gen ──> crossfade ──> pieces
    ...

- T3 for text chunk k+1 (up to `lookahead_chunks` ahead) starts as soon as chunk k starts being vocoded.
- Streaming: S3Gen gets the growing token prefix with the `StreamState` it returned last time, first after
  `first_chunk_tokens` tokens of a text chunk, then every `stream_chunk_tokens`, and once more with
  `finalize=True` when T3 finishes. When T3 runs ahead, every call takes all tokens available.
- One-shot: one `VocodeJob(finalize=True)` per text chunk, once its tokens are complete.
- Consecutive text chunks are joined with a `crossfade_samples` crossfade.
- Closing the returned generator (client gone, error) cancels every T3 stream still running.

No torch; audio is float32 numpy at 24 kHz.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from serve_app.serving.audio import Crossfader
from serve_app.contracts import SPEECH_TOKEN_RATE, SynthesisParams, T3Job, TokenChunk, VocodeJob, VocodeResult
from serve_app.serving.errors import StageError
from serve_app.serving.stages.stage_client import StageClient

logger = logging.getLogger(__name__)

_END = object()  # end of one T3 stream in its token queue


@dataclass
class PipelineStats:
    num_speech_tokens: int = 0
    num_vocode_calls: int = 0
    num_samples: int = 0
    first_audio_at: float | None = None  # time.monotonic() of the first non-empty piece
    finish_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineConfig:
    first_chunk_tokens: int = 25
    stream_chunk_tokens: int = 50
    lookahead_chunks: int = 1
    crossfade_samples: int = 480
    max_seconds_per_char: float = 0.0   # 0: every chunk may use params.max_new_tokens


def chunk_token_cap(text: str, max_new_tokens: int, max_seconds_per_char: float) -> int:
    """Speech token cap for one text chunk: max_new_tokens, or less for short text (2 s + k s per character)."""
    if max_seconds_per_char <= 0:
        return max_new_tokens
    return min(max_new_tokens, math.ceil(SPEECH_TOKEN_RATE * (2.0 + max_seconds_per_char * len(text))))


class SpeechPipeline:
    def __init__(self, t3: StageClient, s3gen: StageClient, config: PipelineConfig):
        self.t3 = t3
        self.s3gen = s3gen
        self.config = config

    async def run(self, request_id: str, chunks: list[str], voice_id: str, params: SynthesisParams, *,
                  streaming: bool, stats: PipelineStats | None = None) -> AsyncIterator[np.ndarray]:
        """Yields float32 [N] pieces of the request's audio, in order. Close it to cancel the request."""
        stats = stats if stats is not None else PipelineStats()
        crossfader = Crossfader(self.config.crossfade_samples)
        running: deque[tuple[asyncio.Queue, asyncio.Task]] = deque()
        all_tasks: list[asyncio.Task] = []
        next_chunk = 0

        def emit(samples: np.ndarray) -> np.ndarray:
            if samples.size and stats.first_audio_at is None:
                stats.first_audio_at = time.monotonic()
            stats.num_samples += samples.size
            return samples

        try:
            for index in range(len(chunks)):
                while next_chunk < len(chunks) and len(running) <= self.config.lookahead_chunks:
                    text = chunks[next_chunk]
                    cap = chunk_token_cap(text, params.max_new_tokens, self.config.max_seconds_per_char)
                    job = T3Job(request_id=f"{request_id}-{next_chunk}", text=text, voice_id=voice_id,
                                params=dataclasses.replace(params, max_new_tokens=cap))
                    queue: asyncio.Queue = asyncio.Queue()
                    task = asyncio.create_task(self._produce_tokens(job, queue, stats))
                    running.append((queue, task))
                    all_tasks.append(task)
                    next_chunk += 1
                queue, _ = running.popleft()
                vocode = self._vocode_streaming if streaming else self._vocode_once
                async for piece in vocode(f"{request_id}-{index}", queue, voice_id, params.seed, stats):
                    out = crossfader.push(piece)
                    if out.size:
                        yield emit(out)
                out = crossfader.end_segment()
                if out.size:
                    yield emit(out)
            out = crossfader.finish()
            if out.size:
                yield emit(out)
        finally:
            for task in all_tasks:
                task.cancel()
            if all_tasks:
                await asyncio.gather(*all_tasks, return_exceptions=True)

    async def _produce_tokens(self, job: T3Job, queue: asyncio.Queue, stats: PipelineStats) -> None:
        """Runs one T3 stream into `queue`: token lists, then `_END` or the exception that ended it."""
        stream = None
        try:
            stream = self.t3.stream("generate", job)
            async for chunk in stream:
                chunk: TokenChunk
                if chunk.tokens:
                    queue.put_nowait(list(chunk.tokens))
                if chunk.finished:
                    stats.finish_reasons += (chunk.finish_reason or "stop",)
                    if chunk.finish_reason == "error":
                        raise StageError(f"T3 failed on text chunk {job.request_id}.", code="t3_error")
                    if chunk.finish_reason == "length":
                        logger.warning("%s: T3 hit max_new_tokens=%d; the chunk's audio is cut short",
                                       job.request_id, job.params.max_new_tokens)
                    break
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, which raises it in the request's task
            queue.put_nowait(exc)
        finally:
            if stream is not None:
                await stream.aclose()

    @staticmethod
    def _take(item: object, tokens: list[int]) -> bool:
        """Adds a queue item to `tokens`; True at the end of the stream. Raises the producer's exception."""
        if item is _END:
            return True
        if isinstance(item, BaseException):
            raise item
        tokens.extend(item)  # type: ignore[arg-type]
        return False

    async def _vocode(self, job: VocodeJob, stats: PipelineStats) -> VocodeResult:
        stats.num_vocode_calls += 1
        return await self.s3gen.call("vocode", job)

    async def _vocode_once(self, request_id: str, queue: asyncio.Queue, voice_id: str, seed: int | None,
                           stats: PipelineStats) -> AsyncIterator[np.ndarray]:
        tokens: list[int] = []
        while not self._take(await queue.get(), tokens):
            pass
        stats.num_speech_tokens += len(tokens)
        if not tokens:
            logger.warning("%s: T3 produced no speech tokens", request_id)
            return
        result = await self._vocode(VocodeJob(request_id=request_id, speech_tokens=tokens, voice_id=voice_id,
                                              finalize=True, stream_state=None, seed=seed), stats)
        yield np.asarray(result.audio, dtype=np.float32).reshape(-1)

    async def _vocode_streaming(self, request_id: str, queue: asyncio.Queue, voice_id: str, seed: int | None,
                                stats: PipelineStats) -> AsyncIterator[np.ndarray]:
        tokens: list[int] = []
        state = None
        num_sent = 0
        threshold = self.config.first_chunk_tokens
        done = False
        while not done:
            done = self._take(await queue.get(), tokens)
            while not done and not queue.empty():  # T3 ran ahead: take everything available
                done = self._take(queue.get_nowait(), tokens)
            if done or len(tokens) - num_sent < threshold:
                continue
            result = await self._vocode(VocodeJob(request_id=request_id, speech_tokens=list(tokens),
                                                  voice_id=voice_id, finalize=False, stream_state=state, seed=seed),
                                        stats)
            state, num_sent, threshold = result.stream_state, len(tokens), self.config.stream_chunk_tokens
            yield np.asarray(result.audio, dtype=np.float32).reshape(-1)
        stats.num_speech_tokens += len(tokens)
        if not tokens:
            logger.warning("%s: T3 produced no speech tokens", request_id)
            return
        result = await self._vocode(VocodeJob(request_id=request_id, speech_tokens=list(tokens), voice_id=voice_id,
                                              finalize=True, stream_state=state, seed=seed), stats)
        yield np.asarray(result.audio, dtype=np.float32).reshape(-1)
