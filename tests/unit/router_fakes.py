"""Fakes of the stage handles (same methods as contracts.py), a metrics recorder, and audio decoding.

The S3Gen "fake" is the real `S3GenReplica` (its vocoder scheduler, T3 feed and cancellation) over a backend
that makes a tone for every vocoded token, with the fake T3 as its T3 handle."""
from __future__ import annotations

import asyncio
import io
import time
from collections import defaultdict

import av
import numpy as np
import soundfile as sf

from serve_app.contracts import BUILTIN_VOICE, SAMPLE_RATE, SAMPLES_PER_TOKEN, SpeechJob, T3Job, TokenChunk, VoiceInfo
from serve_app.serving.api.app import build_app
from serve_app.serving.api.router import SpeechRouter
from serve_app.serving.router_settings import RouterSettings


def tokens_for(text: str) -> int:
    """How many speech tokens FakeT3 makes for a text chunk: 1 per character (25 chars -> 1 s of audio)."""
    return len(text)


class FakeT3:
    def __init__(self, tokens_per_step: int = 7, step_delay_s: float = 0.0, fail_on_chunk: int | None = None,
                 raise_on_start: BaseException | None = None):
        self.tokens_per_step = tokens_per_step
        self.step_delay_s = step_delay_s
        self.fail_on_chunk = fail_on_chunk
        self.raise_on_start = raise_on_start
        self.jobs: list[T3Job] = []
        self.events: list[tuple[str, str, float]] = []  # (what, request_id, time)
        self.cancelled: list[str] = []
        self.completed: list[str] = []

    async def generate(self, job: T3Job):
        self.jobs.append(job)
        self.events.append(("t3_start", job.request_id, time.monotonic()))
        if self.raise_on_start is not None:
            raise self.raise_on_start
        total = tokens_for(job.text)
        chunk_index = int(job.request_id.rsplit("-", 1)[1])
        started = time.monotonic()
        try:
            for start in range(0, total, self.tokens_per_step):
                await asyncio.sleep(self.step_delay_s)
                if self.fail_on_chunk == chunk_index and start > 0:
                    yield TokenChunk(job.request_id, [], finished=True, finish_reason="error")
                    return
                tokens = [(i * 37) % 6561 for i in range(start, min(total, start + self.tokens_per_step))]
                # the first block carries T3's split of its wait, as T3Replica's does (a token step, no decode)
                timings = (dict(t3_first_token=time.monotonic() - started, t3_first_block=0.0) if start == 0
                           else None)
                yield TokenChunk(job.request_id, tokens, timings=timings)
            yield TokenChunk(job.request_id, [], finished=True, finish_reason="stop")
            self.completed.append(job.request_id)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(job.request_id)
            raise
        finally:
            self.events.append(("t3_end", job.request_id, time.monotonic()))

    async def memory_report(self) -> dict:
        return {"stage": "t3", "device": "cpu", "allocated_bytes": 0}


def tone(num_samples: int, start: int = 0) -> np.ndarray:
    t = (np.arange(num_samples) + start) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)


class ToneBackend:
    """An S3Gen backend: SAMPLES_PER_TOKEN samples of a tone per vocoded token, the flow's 3 look-ahead tokens
    held back until the stream's last step, as the engine does. Records every item and step."""

    name = "tone"

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.items: list = []                 # every VocodeItem, in order
        self.steps: list[list] = []           # the items of each engine step
        self.events: list[tuple[str, str, float]] = []

    def prepare_conds(self, conds):
        return conds

    def new_stream_state(self) -> dict:
        return {"num_samples": 0}

    def vocode_batch(self, items):
        self.steps.append(list(items))
        for it in items:
            self.items.append(it)
            self.events.append(("vocode_start", it.request_id, time.monotonic()))
        time.sleep(self.delay_s)
        out = []
        for it in items:
            start = 0 if it.state is None else it.state["num_samples"]
            held = 0 if it.finalize else 3
            n = max(0, (len(it.tokens) - held) * SAMPLES_PER_TOKEN - start)
            out.append((tone(n, start), None if it.state is None else {"num_samples": start + n}))
            self.events.append(("vocode_end", it.request_id, time.monotonic()))
        return out


class _CondsMethod:
    async def remote(self, voice_id):
        return ("conds", voice_id)


class _CondsHandle:
    get_conds = _CondsMethod()


class FakeS3Gen:
    """`synthesize` of a real S3GenReplica (ToneBackend), or `raise_exc` at the call, as an unavailable stage."""

    def __init__(self, delay_s: float = 0.0, raise_exc: BaseException | None = None):
        self.backend = ToneBackend(delay_s)
        self.raise_exc = raise_exc
        self.jobs: list[SpeechJob] = []
        self.replica = None

    def attach(self, t3) -> None:
        from serve_app.serving.config import S3GenSettings
        from serve_app.serving.stages.s3gen_stage import S3GenReplica

        self.replica = S3GenReplica(None, _CondsHandle(), S3GenSettings(), backend=self.backend, t3_handle=t3)

    @property
    def items(self) -> list:
        return self.backend.items

    @property
    def events(self) -> list:
        return self.backend.events

    async def synthesize(self, job: SpeechJob):
        self.jobs.append(job)
        if self.raise_exc is not None:
            raise self.raise_exc
        async for block in self.replica.synthesize(job):
            yield block

    async def memory_report(self) -> dict:
        return {"stage": "s3gen", "device": "cpu", "allocated_bytes": 0}


class FakeVoices:
    def __init__(self):
        self.voices: dict[str, VoiceInfo] = {
            BUILTIN_VOICE: VoiceInfo(BUILTIN_VOICE, "Built-in", 0, 10.0, builtin=True)}
        self.enrolled_audio: dict[str, bytes] = {}
        self.fail_memory = False

    async def enroll(self, audio: bytes, name: str | None) -> VoiceInfo:
        samples, sr = sf.read(io.BytesIO(audio), dtype="float32")  # the router sends mono PCM16 WAV
        voice_id = f"voice_{len(self.voices)}"
        info = VoiceInfo(voice_id, name or voice_id, 1_700_000_000, samples.size / sr)
        self.voices[voice_id] = info
        self.enrolled_audio[voice_id] = audio
        return info

    async def list_voices(self) -> list[VoiceInfo]:
        return list(self.voices.values())

    async def delete(self, voice_id: str) -> None:
        del self.voices[voice_id]

    async def memory_report(self) -> dict:
        if self.fail_memory:
            raise RuntimeError("voice replica is down")
        return {"stage": "voice", "device": "cpu"}


class FakeMetric:
    def __init__(self, store: list, name: str):
        self.store, self.name = store, name

    def observe(self, value, tags=None):
        self.store.append((self.name, value, tags))

    def inc(self, value=1, tags=None):
        self.store.append((self.name, value, tags))

    def set(self, value, tags=None):   # a gauge: each value it was set to
        self.store.append((self.name, value, tags))


class FakeMetrics:
    def __init__(self):
        self.calls: list = []

    def __getattr__(self, name):
        return FakeMetric(self.calls, name)

    def values(self, name: str) -> list:
        return [(v, t) for n, v, t in self.calls if n == name]


class Stack:
    """A router over fakes, and its FastAPI app."""

    def __init__(self, t3=None, s3gen=None, voices=None, watermarker=None, **settings):
        self.t3, self.s3gen, self.voices = t3 or FakeT3(), s3gen or FakeS3Gen(), voices or FakeVoices()
        self.s3gen.attach(self.t3)
        self.metrics = FakeMetrics()
        settings.setdefault("watermark", False)
        self.router = SpeechRouter(self.t3, self.s3gen, self.voices, RouterSettings(**settings),
                                   watermarker=watermarker, metrics=self.metrics)
        self.app = build_app(self.router)

    def expected_samples(self, text: str, max_chunk_chars: int | None = None) -> int:
        from serve_app.serving.pipeline.chunking import chunk_text

        chunks = chunk_text(text, max_chunk_chars or self.router.settings.max_chunk_chars)
        total = sum(tokens_for(c) for c in chunks) * SAMPLES_PER_TOKEN
        return total - self.router.settings.crossfade_samples * (len(chunks) - 1)


def decode_any(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of encoded bytes in any response_format."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, SAMPLE_RATE
    if fmt == "wav":
        return sf.read(io.BytesIO(data), dtype="float32")
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        rate = stream.codec_context.sample_rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        parts = [o.to_ndarray().reshape(-1) for f in c.decode(stream) for o in resampler.resample(f)]
        parts += [o.to_ndarray().reshape(-1) for o in resampler.resample(None)]
        return np.concatenate(parts), rate


# codec padding (mp3/aac frames) in seconds
TOLERANCE_S = {"mp3": 0.1, "aac": 0.1, "opus": 0.03, "flac": 0.0, "wav": 0.0, "pcm": 0.0}
SAMPLE_RATES = defaultdict(lambda: SAMPLE_RATE, opus=48_000)  # opus always decodes at 48 kHz
