"""Voice stage: enrolls reference clips into voices, stores them, serves their conditionals by id.

Handle methods: `enroll(audio: bytes, name: str | None) -> VoiceInfo`, `list_voices() -> list[VoiceInfo]`,
`delete(voice_id) -> None`, `get_conds(voice_id) -> VoiceConds`, `memory_report() -> dict`. Voices live in
`VoiceStore` (one folder per voice, upstream conds.pt); recently used conditionals stay in a bounded LRU.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from serve_app.serving.config import VoiceSettings, stage_device
from serve_app.contracts import BUILTIN_VOICE, VoiceConds, VoiceInfo
from serve_app.serving.errors import InvalidRequestError, VoiceNotFoundError
from serve_app.serving.metrics import get_metrics
from serve_app.serving.stages.replica_device import ReplicaDevice
from serve_app.serving.stages.stage_common import configure_replica_logging
from serve_app.serving.stages.voice_backend import Enroller, EngineEnroller, UpstreamEnroller
from serve_app.serving.stages.voice_store import VoiceStore, conditionals_to_voice_conds

log = logging.getLogger(__name__)

MIN_REFERENCE_S = 1.0


def make_enroller(checkpoint: Any, settings: VoiceSettings, rd: ReplicaDevice) -> Enroller:
    from serve_app.model.loader import load_s3gen, load_voice_encoder
    from serve_app.model.presets import get_preset, t3_config

    s3gen = load_s3gen(checkpoint, rd.device, enrollment=True)
    ve = load_voice_encoder(checkpoint, rd.device)
    prompt_len = t3_config(get_preset("full"), checkpoint.multilingual).speech_cond_prompt_len
    if settings.backend == "engine":
        try:
            from serve_app.engine.enrollment import VoiceEnroller
        except ImportError as e:
            log.warning("voice backend 'engine' unavailable (%s); enrolling with the upstream math", e)
            return UpstreamEnroller(s3gen, ve, prompt_len, rd.device)
        # keeps only the S3 tokenizer, CAMPPlus and the voice encoder: flow and HiFT are freed with `s3gen`
        return EngineEnroller(VoiceEnroller.from_s3gen(ve, s3gen, rd.device, speech_cond_prompt_len=prompt_len))
    return UpstreamEnroller(s3gen, ve, prompt_len, rd.device)


def load_builtin(checkpoint: Any) -> VoiceConds | None:
    from serve_app.model.loader import load_builtin_conds

    conds = load_builtin_conds(checkpoint, "cpu")
    return conditionals_to_voice_conds(conds) if conds is not None else None


class VoiceReplica:
    def __init__(self, checkpoint: Any, settings: VoiceSettings, *, enroller: Enroller | None = None,
                 builtin: VoiceConds | None = None, voices_dir: Path | None = None) -> None:
        configure_replica_logging()
        self.settings = settings
        self.rd = ReplicaDevice.setup("voice", stage_device(settings), settings.num_gpus, "float32")
        t0 = time.perf_counter()
        self.enroller = enroller or make_enroller(checkpoint, settings, self.rd)
        root = voices_dir or settings.voices_dir
        if root is None:
            raise ValueError("voice.voices_dir is unset; resolve the config with ServeConfig.with_env_defaults()")
        self.store = VoiceStore(Path(root), builtin if builtin is not None else load_builtin(checkpoint))
        self._cache: OrderedDict[str, VoiceConds] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voice-enroll")
        self._metrics = get_metrics()
        log.info("Voice stage ready in %.1fs: backend=%s device=%s voices_dir=%s (%d voices)",
                 time.perf_counter() - t0, self.enroller.name, self.rd.device, self.store.root,
                 len(self.store.list()))

    async def enroll(self, audio: bytes, name: str | None = None, exaggeration: float = 0.5) -> VoiceInfo:
        from serve_app.serving.audio import decode_upload

        wav, sr = decode_upload(audio)
        duration_s = wav.size / sr
        if duration_s < MIN_REFERENCE_S:
            raise InvalidRequestError(f"The reference clip is {duration_s:.2f}s; send at least {MIN_REFERENCE_S:.0f}s "
                                      "of speech (5-10 s works best).", param="file", code="reference_too_short")
        if duration_s > self.settings.max_reference_s:
            raise InvalidRequestError(f"The reference clip is {duration_s:.1f}s; send at most "
                                      f"{self.settings.max_reference_s:.0f}s (only the first 10 s are used).",
                                      param="file", code="reference_too_long")
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        conds = await loop.run_in_executor(self._executor, self.enroller.enroll, wav, sr, exaggeration)
        info = self.store.add(conds, name, duration_s)
        self._metrics.voice_enroll_seconds.observe(time.perf_counter() - t0)
        log.info("enrolled voice %s (%r, %.1fs reference) in %.2fs", info.voice_id, info.name, duration_s,
                 time.perf_counter() - t0)
        return info

    async def list_voices(self) -> list[VoiceInfo]:
        return self.store.list()

    async def delete(self, voice_id: str) -> None:
        self._cache.pop(voice_id, None)
        self.store.delete(voice_id)

    async def get_conds(self, voice_id: str) -> VoiceConds:
        if voice_id != BUILTIN_VOICE and not self.store.exists(voice_id):   # deleted through another replica
            self._cache.pop(voice_id, None)
            raise VoiceNotFoundError(f"Voice {voice_id!r} not found; list voices with GET /v1/voices.")
        if voice_id in self._cache:
            self._cache.move_to_end(voice_id)
            return self._cache[voice_id]
        conds = self.store.load(voice_id)
        self._cache[voice_id] = conds
        while len(self._cache) > self.settings.max_cached_voices:
            self._cache.popitem(last=False)
        return conds

    def memory_report(self) -> dict:
        return {**self.rd.memory_report(), "backend": self.enroller.name, "num_cached_voices": len(self._cache)}

    def check_health(self) -> None:
        self.rd.export_metrics()


VoiceStage = serve.deployment(VoiceReplica, name="VoiceStage")
