"""S3Gen stage: speech tokens -> 24 kHz audio, batched by total tokens with @serve.batch.

Handle method: `vocode(job: VocodeJob) -> VocodeResult`. Jobs wait up to `batch_wait_timeout_s` to be vocoded
together while their tokens sum to at most `max_batch_tokens` (both from `user_config`, tunable at runtime via
`reconfigure`); a job larger than a whole batch runs alone. The replica keeps no per-stream state: streaming
callers pass back the `StreamState` they got last time. (The Perth watermark is applied by the router, where
the final audio is assembled.)
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from serve_app.serving.stages.conds_cache import CondsCache
from serve_app.serving.config import S3GenSettings, S3GenUserConfig, stage_device
from serve_app.contracts import SAMPLE_RATE, VocodeJob, VocodeResult, VoiceConds
from serve_app.serving.metrics import get_metrics
from serve_app.serving.stages.replica_device import ReplicaDevice
from serve_app.serving.stages.s3gen_backend import EngineS3GenBackend, S3GenBackend, UpstreamS3GenBackend
from serve_app.serving.stages.stage_common import configure_replica_logging, describe, quantize_upstream, resolve_quant, spec_for

log = logging.getLogger(__name__)

_DEFAULTS = S3GenUserConfig()
S3GEN_COMPONENTS = ("s3gen_flow_encoder", "s3gen_flow_decoder")   # what runs per request (HiFT: convolutions)


def num_batch_tokens(items: list[tuple[VocodeJob, Any]]) -> int:
    """@serve.batch size of a batch: its total speech tokens (at least 1 per job)."""
    return sum(max(1, len(job.speech_tokens)) for job, _ in items)


def make_s3gen_backend(checkpoint: Any, settings: S3GenSettings, rd: ReplicaDevice,
                       quantization: str | None) -> S3GenBackend:
    from serve_app.model.loader import load_s3gen

    specs = resolve_quant(quantization, rd.device, "s3gen")
    if settings.backend == "engine":
        # the engine runs only flow + HiFT: no S3 tokenizer or speaker encoder in this replica; it quantizes the
        # flow (encoder + CFM estimator) with one spec
        s3gen = load_s3gen(checkpoint, rd.device, enrollment=False)
        spec = spec_for(specs, "s3gen_flow_decoder")
        rd.quantization["s3gen"] = describe({"flow": spec} if spec else {}, ("flow",))
        return EngineS3GenBackend.from_model(s3gen, device=rd.device, dtype=rd.torch_dtype, quant=spec,
                                             extra=settings.engine)
    # enrollment=True: upstream S3Gen's `device` property reads the tokenizer's parameters
    s3gen = load_s3gen(checkpoint, rd.device, enrollment=True)
    if rd.torch_dtype != next(s3gen.flow.parameters()).dtype:
        s3gen.flow.to(rd.torch_dtype)
    flow_specs = {k: v for k, v in specs.items() if k in S3GEN_COMPONENTS}
    rd.quantization["s3gen"] = describe(flow_specs, S3GEN_COMPONENTS)
    quantize_upstream(flow_specs, s3gen=s3gen)
    return UpstreamS3GenBackend(s3gen)


def warm_up(backend: S3GenBackend, checkpoint: Any, settings: S3GenSettings, device: str) -> int:
    """Capture the engine's first-chunk CUDA graphs with the built-in voice before taking requests
    (`S3GenEngine.warmup`). GPU engine replicas only; -> engine steps run (0: skipped)."""
    if not settings.warmup_batch_sizes or not isinstance(backend, EngineS3GenBackend) \
            or not str(device).startswith("cuda"):
        return 0
    from serve_app.model.loader import load_builtin_conds

    conds = load_builtin_conds(checkpoint, device) if hasattr(checkpoint, "layout") else None
    if conds is None:
        log.info("S3Gen warm-up skipped: the checkpoint has no built-in voice (conds.pt)")
        return 0
    try:
        return backend.engine.warmup(conds.gen, settings.warmup_first_chunk_tokens,
                                     tuple(settings.warmup_batch_sizes))
    except Exception:  # an optimization: the first requests capture their graphs themselves instead
        log.exception("S3Gen warm-up failed; continuing without pre-captured graphs")
        return 0


class S3GenReplica:
    def __init__(self, checkpoint: Any, voice_handle: Any, settings: S3GenSettings, quantization: str | None = None,
                 backend: S3GenBackend | None = None) -> None:
        configure_replica_logging()
        self.settings = settings
        self.rd = ReplicaDevice.setup("s3gen", stage_device(settings), settings.num_gpus, settings.dtype)
        t0 = time.perf_counter()
        self.backend = backend or make_s3gen_backend(checkpoint, settings, self.rd, quantization)
        warm_up(self.backend, checkpoint, settings, self.rd.device)
        self._voice = voice_handle
        self.conds = CondsCache(self._fetch_conds, self.backend.prepare_conds, settings.max_cached_voices, "s3gen")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3gen")
        self._metrics = get_metrics()
        self._tags = {"backend": self.backend.name}
        self._max_batch_tokens = settings.user_config.max_batch_tokens
        self._num_running = 0
        self.reconfigure(settings.user_config.model_dump())
        log.info("S3Gen stage ready in %.1fs: backend=%s device=%s dtype=%s quantization=%s weights=%s",
                 time.perf_counter() - t0, self.backend.name, self.rd.device, self.rd.dtype,
                 self.rd.quantization.get("s3gen", "none"),
                 checkpoint.describe() if hasattr(checkpoint, "describe") else checkpoint)

    async def _fetch_conds(self, voice_id: str) -> VoiceConds:
        return await self._voice.get_conds.remote(voice_id)

    async def vocode(self, job: VocodeJob) -> VocodeResult:
        conds = await self.conds.get(job.voice_id)
        self._num_running += 1
        self._metrics.s3gen_queue_depth.set(self._num_running, tags=self._tags)
        try:
            if len(job.speech_tokens) > self._max_batch_tokens:
                return (await self._run([(job, conds)]))[0]
            return await self._vocode_batched((job, conds))
        finally:
            self._num_running -= 1
            self._metrics.s3gen_queue_depth.set(self._num_running, tags=self._tags)

    @serve.batch(max_batch_size=_DEFAULTS.max_batch_tokens, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
                 batch_size_fn=num_batch_tokens)
    async def _vocode_batched(self, items: list[tuple[VocodeJob, Any]]) -> list[VocodeResult]:
        return await self._run(items)

    async def _run(self, items: list[tuple[VocodeJob, Any]]) -> list[VocodeResult]:
        jobs, conds = [j for j, _ in items], [c for _, c in items]
        t0 = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(self._executor, self._vocode_sync, jobs, conds)
        self._metrics.s3gen_batch_seconds.observe(time.perf_counter() - t0, tags=self._tags)
        self._metrics.s3gen_batch_size.observe(len(jobs), tags=self._tags)
        self._metrics.s3gen_batch_tokens.observe(sum(len(j.speech_tokens) for j in jobs), tags=self._tags)
        return results

    def _vocode_sync(self, jobs: list[VocodeJob], conds: list[Any]) -> list[VocodeResult]:
        # runs on the worker thread
        results = self.backend.vocode_batch(jobs, conds)
        num_samples = sum(r.audio.size for r in results)
        self._metrics.audio_seconds_total.inc(num_samples / SAMPLE_RATE, tags={"stage": "s3gen"})
        return results

    def reconfigure(self, user_config: dict) -> None:
        cfg = S3GenUserConfig.model_validate(user_config or {})
        self._max_batch_tokens = cfg.max_batch_tokens
        self._vocode_batched.set_max_batch_size(cfg.max_batch_tokens)
        self._vocode_batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        log.info("S3Gen stage user_config: %s", cfg.model_dump())

    def invalidate_voice(self, voice_id: str) -> None:
        self.conds.invalidate(voice_id)

    def memory_report(self) -> dict:
        return {**self.rd.memory_report(), "backend": self.backend.name,
                "max_batch_tokens": self._max_batch_tokens, "num_cached_voices": len(self.conds)}

    def check_health(self) -> None:
        self.rd.export_metrics()


S3GenStage = serve.deployment(S3GenReplica, name="S3GenStage")
