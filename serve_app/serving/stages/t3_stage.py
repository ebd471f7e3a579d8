"""T3 stage: text chunk -> streamed speech tokens. A thin shim over a `T3Backend` (see t3_backend.py).

`T3Replica` is the plain class (construct it directly in tests, with a fake voice handle and backend);
`T3Stage` is the Ray Serve deployment built from it. Handle method: `generate(job: T3Job)` streaming
`TokenChunk`s in the job's blocks (the backend's `TokenBlocks`; call with `handle.options(stream=True)`);
cancelling the caller's generator cancels the request in the backend.
"""
from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from ray import serve

from serve_app.serving.stages.conds_cache import CondsCache
from serve_app.serving.config import T3Settings, T3UserConfig, stage_device
from serve_app.contracts import T3Job, TokenChunk
from serve_app.serving.metrics import get_metrics
from serve_app.serving.stages.replica_device import ReplicaDevice
from serve_app.serving.stages.stage_common import (
    EngineTotals, configure_replica_logging, describe, log_stage_ready, quantize_upstream, resolve_quant, spec_for,
)
from serve_app.serving.stages.t3_backend import EngineT3Backend, T3Backend, UpstreamT3Backend

log = logging.getLogger(__name__)

T3_COMPONENTS = ("t3", "t3_extra")


def make_t3_backend(checkpoint: Any, settings: T3Settings, rd: ReplicaDevice, quantization: str | None) -> T3Backend:
    """Load T3 and its tokenizer from the checkpoint and wrap them in the configured backend."""
    from serve_app.model.loader import load_t3, load_text_tokenizer

    t3 = load_t3(checkpoint, rd.device, rd.torch_dtype)
    tokenizer = load_text_tokenizer(checkpoint)
    specs = resolve_quant(quantization, rd.device, "t3")
    rd.quantization["t3"] = describe(specs, T3_COMPONENTS)
    if settings.backend == "engine":
        m = get_metrics()
        num_slots = fit_slots(settings, specs, rd, checkpoint)

        slots = [num_slots]   # the engine's own count once it exists
        engine: list = []     # the engine once it exists: its KV-read totals become counter increments
        tags = {"backend": "engine"}
        totals = EngineTotals(tags)

        def on_step(seconds: float, batch: int) -> None:
            if engine:
                st = engine[0].stats
                totals.export([(m.t3_kv_positions_read_total, "kv_positions_read", st.kv_positions_read),
                               (m.t3_kv_positions_used_total, "kv_positions_used", st.kv_positions_used)])
            m.t3_step_seconds.observe(seconds, tags=tags)
            if seconds > 0:
                m.t3_busy_seconds_total.inc(seconds, tags=tags)
            m.t3_batch_size.observe(batch, tags=tags)
            occupancy = min(1.0, batch / slots[0])
            m.t3_batch_occupancy_ratio.observe(occupancy, tags=tags)
            if batch:   # exact sums beside the histograms (Ray's Counter.inc refuses 0)
                m.t3_step_requests_total.inc(batch, tags=tags)
                m.t3_step_occupancy_total.inc(occupancy, tags=tags)

        # the engine quantizes the Llama backbone itself (and captures CUDA graphs around it)
        backend = EngineT3Backend.from_model(
            t3, tokenizer, multilingual=checkpoint.multilingual, device=rd.device, dtype=rd.torch_dtype,
            max_batch_size=num_slots, quant=spec_for(specs, "t3"), extra=settings.engine,
            on_step=on_step)
        slots[0] = backend.engine.config.max_batch_requests
        engine.append(backend.engine)
        return backend
    quantize_upstream({k: v for k, v in specs.items() if k in T3_COMPONENTS}, t3=t3)
    return UpstreamT3Backend(t3, tokenizer, multilingual=checkpoint.multilingual, dtype=rd.torch_dtype)


def fit_slots(settings: T3Settings, specs: dict, rd: ReplicaDevice, checkpoint: Any) -> int:
    """KV slots of a GPU engine replica: `max_batch_size`, lowered to what the memory estimator says fits in the
    replica's share of its GPU (weights as quantized, KV cache, activations, CUDA context)."""
    want = settings.user_config.max_batch_size
    budget = rd.memory_report().get("budget_bytes", 0) if rd.device == "cuda" else 0
    if not budget:
        return want
    from quant import QuantSpec
    from serve_app.planning import t3_slots_that_fit

    full = {"t3": QuantSpec("none", "bf16" if rd.dtype == "bfloat16" else "fp32"),
            "t3_extra": QuantSpec("none", "fp32"), **specs}
    seq_len = int(settings.engine.get("max_seq_len", 1536))
    preset = getattr(checkpoint, "preset", None) or "full"
    fits = t3_slots_that_fit(budget, full, preset=preset if preset in ("full", "tiny") else "full", seq_len=seq_len,
                             upper=want)
    if fits < want:
        log.warning("T3: %d KV slots of %d positions fit in this replica's %.1f GiB (max_batch_size=%d); using %d",
                    fits, seq_len, budget / 2**30, want, fits)
    else:
        log.info("T3: %d KV slots (max_batch_size) fit in this replica's %.1f GiB by the memory estimator", want,
                 budget / 2**30)
    return fits


class T3Replica:
    def __init__(self, checkpoint: Any, voice_handle: Any, settings: T3Settings, quantization: str | None = None,
                 backend: T3Backend | None = None) -> None:
        configure_replica_logging()
        self.settings = settings
        self.rd = ReplicaDevice.setup("t3", stage_device(settings), settings.num_gpus, settings.dtype)
        t0 = time.perf_counter()
        self.backend = backend or make_t3_backend(checkpoint, settings, self.rd, quantization)
        self.conds = CondsCache.from_voice_stage(voice_handle, self.backend.prepare_conds,
                                                 settings.max_cached_voices, "t3")
        self._metrics = get_metrics()
        self._tags = {"backend": self.backend.name}
        self._num_running = 0
        log_stage_ready("T3", time.perf_counter() - t0, self.backend.name, self.rd, checkpoint)

    async def generate(self, job: T3Job) -> AsyncIterator[TokenChunk]:
        conds = await self.conds.get(job.voice_id)
        started = time.monotonic()
        t0 = time.perf_counter()
        num_tokens = 0
        self._num_running += 1
        self._metrics.t3_queue_depth.set(self._num_running, tags=self._tags)
        try:
            async for chunk in self.backend.generate(job, conds, started):
                num_tokens += len(chunk.tokens)
                yield chunk
        finally:
            self._num_running -= 1
            self._metrics.t3_queue_depth.set(self._num_running, tags=self._tags)
            self._metrics.t3_request_seconds.observe(time.perf_counter() - t0, tags=self._tags)
            if num_tokens:   # Ray's Counter.inc refuses 0 (a request cancelled before its first token)
                self._metrics.t3_speech_tokens_total.inc(num_tokens, tags=self._tags)
            if self.backend.name == "upstream":
                self._metrics.t3_batch_size.observe(1, tags=self._tags)

    def reconfigure(self, user_config: dict) -> None:
        cfg = T3UserConfig.model_validate(user_config or {})
        if cfg.max_batch_size != self.settings.user_config.max_batch_size and self.backend.name == "engine":
            log.warning("T3 engine slots are allocated at start-up (%d); max_batch_size=%d takes effect when the "
                        "replica restarts", self.settings.user_config.max_batch_size, cfg.max_batch_size)
        log.info("T3 stage user_config: %s", cfg.model_dump())

    def invalidate_voice(self, voice_id: str) -> None:
        self.conds.invalidate(voice_id)

    def memory_report(self) -> dict:
        return {**self.rd.memory_report(), "backend": self.backend.name,
                "num_unfinished": self.backend.num_unfinished(), "num_cached_voices": len(self.conds)}

    def check_health(self) -> None:
        self.rd.export_metrics()

    def __del__(self) -> None:
        close = getattr(getattr(self, "backend", None), "close", None)
        if close is not None:
            close()


T3Stage = serve.deployment(T3Replica, name="T3Stage")
