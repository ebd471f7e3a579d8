"""Helpers for streamed speech responses: the output chain (tempo -> watermark -> encoder), priming a stream so
early stage errors keep their HTTP status, and cancelling work when the client disconnects. No torch here
(Perth, imported only when the watermark is on, brings its own).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from serve_app.serving.audio import AudioEncoder, TimeStretcher
from serve_app.contracts import SAMPLE_RATE

logger = logging.getLogger(__name__)

WatermarkFn = Callable[[np.ndarray], np.ndarray]  # float32 [N] at 24 kHz -> float32 [N]
WATERMARK_BLOCK_SAMPLES = SAMPLE_RATE // 2  # streamed audio is watermarked in blocks of >= 0.5 s


class ClientDisconnected(Exception):
    pass


def default_watermarker(enabled: bool) -> WatermarkFn | None:
    """Perth, as upstream applies it; None when disabled. Importing perth pulls in torch: only when enabled."""
    if not enabled:
        return None
    from serve_app.serving.pipeline.watermark import Watermarker as PerthWatermarker

    return PerthWatermarker(enabled=True, sample_rate=SAMPLE_RATE).apply


def apply_watermark(watermarker: WatermarkFn, audio: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
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


class AudioOut:
    """Pipeline audio -> tempo change -> watermark -> encoded bytes, piece by piece."""

    def __init__(self, fmt: str, speed: float, watermarker: WatermarkFn | None):
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
            samples = apply_watermark(self.watermarker, raw, self._context)
            self._context = np.concatenate([self._context, raw])[-WATERMARK_BLOCK_SAMPLES:]
        self.num_samples += samples.size
        return self.encoder.encode(samples)

    def push(self, samples: np.ndarray) -> bytes:
        return self._encode(self.stretcher.push(samples), final=False)

    def finish(self) -> bytes:
        return self._encode(self.stretcher.flush(), final=True) + self.encoder.finish()


async def prime(stream: AsyncIterator[bytes]) -> bytes | None:
    """The stream's first item (None when it is empty); on failure the stream is closed and the error raised."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await stream.aclose()
        raise


async def cancel_on_disconnect(coro, is_disconnected: Callable[[], Any]):
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
                # a cancelled Ray receive ends with TaskCancelledError, not CancelledError: retrieve it, or asyncio
                # logs "Task exception was never retrieved"
                task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
