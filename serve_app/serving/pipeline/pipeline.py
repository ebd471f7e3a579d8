"""The speech pipeline of one request: text chunks -> S3Gen stage (which runs T3 itself) -> joined audio pieces.

    chunk 0:  S3Gen.synthesize ──(T3 tokens in blocks, inside the stage)──> audio blocks ──┐
    chunk 1:      S3Gen.synthesize (started up to `lookahead_chunks` early) ──> crossfade ──> pieces
    ...

- Each text chunk is one long-lived streaming call to the S3Gen stage (`SpeechJob`), pinned to one replica for
  the chunk's life: that replica starts the chunk's T3 stream, keeps the vocoder state and batches the chunk's
  vocoder steps with every other stream it runs. Tokens never reach the router; only audio does.
- Streaming: blocks arrive as the vocoder makes them (first after `first_chunk_tokens`). One-shot: one block per
  text chunk, decoded once when T3 is done (the cheapest path).
- The call for text chunk k+1 starts (up to `lookahead_chunks` ahead) as soon as chunk k starts being consumed,
  so T3 runs ahead of the vocoder.
- Consecutive text chunks are joined with a `crossfade_samples` crossfade.
- A later text chunk turned away by a full stage queue (Ray's BackPressureError) is asked for again, with
  backoff, up to `busy_retries` times: its request has started (audio may be playing), so it waits for room rather
  than be cut. The first chunk's rejection goes to the client as a 429 before anything started.
- Closing the returned generator (client gone, error) cancels every stage call still running (Ray cancels the
  S3Gen call, which cancels its T3 call).

No torch; audio is float32 numpy at 24 kHz.
"""
from __future__ import annotations

import dataclasses
import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from serve_app.contracts import SAMPLE_RATE, SPEECH_TOKEN_RATE, AudioBlock, SpeechJob, SynthesisParams
from serve_app.serving.audio import Crossfader
from serve_app.serving.errors import is_backpressure
from serve_app.serving.stages.stage_client import StageClient, StageStream

logger = logging.getLogger(__name__)


@dataclass
class PipelineStats:
    num_speech_tokens: int = 0
    num_samples: int = 0
    first_audio_at: float | None = None  # time.monotonic() of the first non-empty piece
    stalled: bool = False                # a piece came later than a listener starting at the first one needed it
    finish_reasons: tuple[str, ...] = ()
    first_audio_timings: dict[str, float] | None = None   # the first chunk's, from the S3Gen replica


@dataclass(frozen=True)
class PipelineConfig:
    first_chunk_tokens: int = 25
    stream_chunk_tokens: int = 50
    lookahead_chunks: int = 1
    crossfade_samples: int = 480
    max_seconds_per_char: float = 0.0   # 0: every chunk may use params.max_new_tokens
    t3_block_tokens: int = 16
    first_chunks_first: bool = True     # a request's first text chunk before others' later ones in T3's queue
    stall_tolerance_s: float = 0.05     # lateness that does not count as a stall (one network hop)
    busy_retries: int = 20              # a later chunk turned away by a full stage queue is asked for again ...
    busy_backoff_s: float = 0.05        # ... after this, doubling up to 1 s a wait (~16 s in all)


def chunk_token_cap(text: str, max_new_tokens: int, max_seconds_per_char: float) -> int:
    """Speech token cap for one text chunk: max_new_tokens, or less for short text (2 s + k s per character)."""
    if max_seconds_per_char <= 0:
        return max_new_tokens
    return min(max_new_tokens, math.ceil(SPEECH_TOKEN_RATE * (2.0 + max_seconds_per_char * len(text))))


class SpeechPipeline:
    def __init__(self, s3gen: StageClient, config: PipelineConfig):
        self.s3gen = s3gen    # the only stage called here: the S3Gen stage calls T3 itself
        self.config = config

    def _job(self, run_id: str, index: int, text: str, voice_id: str, params: SynthesisParams,
             streaming: bool) -> SpeechJob:
        c = self.config
        cap = chunk_token_cap(text, params.max_new_tokens, c.max_seconds_per_char)
        return SpeechJob(request_id=f"{run_id}-{index}", text=text, voice_id=voice_id,
                         params=dataclasses.replace(params, max_new_tokens=cap), streaming=streaming,
                         first_step_tokens=c.first_chunk_tokens, step_tokens=c.stream_chunk_tokens,
                         t3_block_tokens=c.t3_block_tokens,
                         priority=1 if c.first_chunks_first and index > 0 else 0)

    async def run(self, request_id: str, chunks: list[str], voice_id: str, params: SynthesisParams, *,
                  streaming: bool, stats: PipelineStats | None = None) -> AsyncIterator[np.ndarray]:
        """Yields float32 [N] pieces of the request's audio, in order. Close it to cancel the request.

        The stages see this run's chunks as `{request_id}.{run}-{index}`: a request run again (the router's retry
        after a lost stage replica, the proxy's after a lost router replica, both keep the request id for the
        logs) or a client that reuses an x-request-id never meets an earlier run's streams still open in a stage."""
        stats = stats if stats is not None else PipelineStats()
        run_id = f"{request_id}.{uuid.uuid4().hex[:8]}"
        crossfader = Crossfader(self.config.crossfade_samples)
        running: deque[StageStream] = deque()
        opened: list[StageStream] = []
        next_chunk = 0

        def emit(samples: np.ndarray) -> np.ndarray:
            now = time.monotonic()
            if stats.first_audio_at is None:
                stats.first_audio_at = now
            elif now - stats.first_audio_at > stats.num_samples / SAMPLE_RATE + self.config.stall_tolerance_s:
                stats.stalled = True
            stats.num_samples += samples.size
            return samples

        try:
            for index in range(len(chunks)):
                while next_chunk < len(chunks) and len(running) <= self.config.lookahead_chunks:
                    job = self._job(run_id, next_chunk, chunks[next_chunk], voice_id, params, streaming)
                    stream = self.s3gen.stream("synthesize", job)
                    running.append(stream)
                    opened.append(stream)
                    next_chunk += 1
                stream, retries, admitted = running.popleft(), 0, False
                while True:
                    try:
                        block: AudioBlock = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        # turned away before it started: only a later chunk waits (the first answers 429)
                        if index == 0 or admitted or retries >= self.config.busy_retries or not is_backpressure(exc):
                            raise
                        await asyncio.sleep(min(1.0, self.config.busy_backoff_s * 2 ** retries))
                        retries += 1
                        logger.info("%s: text chunk %d turned away by a full S3Gen queue; asking again (%d of %d)",
                                    request_id, index, retries, self.config.busy_retries)
                        job = self._job(run_id, index, chunks[index], voice_id, params, streaming)
                        stream = self.s3gen.stream("synthesize", job)
                        opened.append(stream)
                        continue
                    admitted = True
                    if block.timings and index == 0 and stats.first_audio_timings is None:
                        stats.first_audio_timings = block.timings
                    stats.num_speech_tokens += block.num_speech_tokens
                    if block.finished:
                        stats.finish_reasons += (block.finish_reason or "stop",)
                    out = crossfader.push(np.asarray(block.audio, dtype=np.float32).reshape(-1))
                    if out.size:
                        yield emit(out)
                    if block.finished:
                        break
                out = crossfader.end_segment()
                if out.size:
                    yield emit(out)
            out = crossfader.finish()
            if out.size:
                yield emit(out)
        finally:
            for stream in opened:
                await stream.aclose()
