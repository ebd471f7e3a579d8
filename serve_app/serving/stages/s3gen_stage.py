"""S3Gen stage: one text chunk end to end, T3's speech tokens -> 24 kHz audio, vocoded with continuous batching.

Handle method: `synthesize(job: SpeechJob)`, streaming `AudioBlock`s (handle.options(stream=True)). The replica
starts the chunk's T3 stream itself (tokens arrive in blocks and never pass through the router), keeps the
chunk's vocoder state for its whole life, and one loop runs every ready stream step and one-shot decode of all
its chunks together in one engine step (`VocodeScheduler` decides what is ready); with `deliver_per_call` each
flow call's audio goes out as that call ends. Closing the caller's stream cancels the T3 request and drops the
state. (The Perth watermark is applied by the router, where the final audio is assembled.)
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from ray import serve

from serve_app.serving.stages.conds_cache import CondsCache
from serve_app.serving.config import S3GenSettings, S3GenUserConfig, stage_device
from serve_app.contracts import (
    FIRST_AUDIO_PHASES, SAMPLE_RATE, T3_FIRST_BLOCK_PHASES, AudioBlock, SpeechJob, T3Job, TokenChunk,
)
from serve_app.serving.metrics import get_metrics
from serve_app.serving.stages.replica_device import ReplicaDevice
from serve_app.serving.errors import StageError
from serve_app.serving.stages.s3gen_backend import EngineS3GenBackend, S3GenBackend, UpstreamS3GenBackend, VocodeItem
from serve_app.serving.stages.stage_client import StageClient
from serve_app.serving.stages.step_profiler import StepProfiler
from serve_app.serving.stages.vocode_scheduler import (
    LOOKAHEAD_TOKENS, StepPlan, VocodePolicy, VocodeScheduler, VocodeStream,
)
from serve_app.serving.stages.stage_common import (
    EngineTotals, configure_replica_logging, describe, log_stage_ready, quantize_upstream, resolve_quant, spec_for,
)

log = logging.getLogger(__name__)

S3GEN_COMPONENTS = ("s3gen_flow_encoder", "s3gen_flow_decoder")   # what runs per request (HiFT: convolutions)


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
    """Capture the engine's CUDA graphs before taking requests: the grid of flow / HiFT shapes
    (`S3GenEngine.capture_graphs`), then the first chunk with the built-in voice (`S3GenEngine.warmup`).
    GPU engine replicas only; -> first-chunk engine steps run (0: skipped)."""
    if not isinstance(backend, EngineS3GenBackend) or not str(device).startswith("cuda"):
        return 0
    if settings.warmup_graph_tokens or settings.warmup_graph_frames:
        t0 = time.perf_counter()
        try:
            n = backend.engine.capture_graphs(settings.warmup_graph_tokens, settings.warmup_graph_frames)
            log.info("S3Gen warm-up: %d CUDA graphs captured in %.1fs", n, time.perf_counter() - t0)
        except Exception:  # an optimization: shapes are captured when first seen instead
            log.exception("S3Gen graph capture failed; continuing, shapes are captured when first seen")
    if not settings.warmup_batch_sizes:
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


def first_audio_timings(marks: dict[str, float], step_started: float, step_done: float,
                        t3_timings: dict[str, float] | None = None) -> dict[str, float] | None:
    """Seconds per FIRST_AUDIO_PHASES of a stream whose first audio a step made (None if a mark is missing).
    `t3_timings`: the T3 replica's own split of the wait for the first block (T3_FIRST_BLOCK_PHASES); the rest of
    that wait is "t3_call" (without the split, all of it: the T3 phases are left out)."""
    if not all(k in marks for k in ("entered", "conds", "t3")):
        return None
    t3 = {k: max(0.0, v) for k, v in (t3_timings or {}).items() if k in T3_FIRST_BLOCK_PHASES}
    out = {"conds": marks["conds"] - marks["entered"],
           "t3_call": marks["t3"] - marks["conds"] - sum(t3.values()), **t3,
           "vocode_wait": step_started - marks["t3"], "vocode": step_done - step_started}
    return {phase: max(0.0, out[phase]) for phase in FIRST_AUDIO_PHASES if phase in out}


class S3GenReplica:
    def __init__(self, checkpoint: Any, voice_handle: Any, settings: S3GenSettings, quantization: str | None = None,
                 backend: S3GenBackend | None = None, t3_handle: Any = None) -> None:
        configure_replica_logging()
        self.settings = settings
        self.rd = ReplicaDevice.setup("s3gen", stage_device(settings), settings.num_gpus, settings.dtype)
        t0 = time.perf_counter()
        self.backend = backend or make_s3gen_backend(checkpoint, settings, self.rd, quantization)
        warm_up(self.backend, checkpoint, settings, self.rd.device)
        if isinstance(self.backend, EngineS3GenBackend):
            self.backend.mark_warm()
        self._t3 = StageClient(t3_handle, "t3") if t3_handle is not None else None
        self.conds = CondsCache.from_voice_stage(voice_handle, self.backend.prepare_conds,
                                                 settings.max_cached_voices, "s3gen")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3gen")   # engine steps, one at a time
        self._profiler = StepProfiler.from_env("s3gen")
        self._metrics = get_metrics()
        self._tags = {"backend": self.backend.name}
        self.scheduler = VocodeScheduler(VocodePolicy(), SAMPLE_RATE)
        self._outputs: dict[str, asyncio.Queue] = {}     # request_id -> AudioBlock | BaseException
        self._wake: asyncio.Event | None = None          # the loop's wake-up
        self._loop_task: asyncio.Task | None = None
        self._totals = EngineTotals(self._tags)       # the engine's running totals -> counters
        self.reconfigure(settings.user_config.model_dump())
        log_stage_ready("S3Gen", time.perf_counter() - t0, self.backend.name, self.rd, checkpoint)

    # ---- the request's side -------------------------------------------------------------------------------
    async def synthesize(self, job: SpeechJob) -> AsyncIterator[AudioBlock]:
        """One text chunk: T3 tokens in blocks -> vocoder scheduler -> audio blocks (the last has finished=True)."""
        if self._t3 is None:
            raise StageError("this S3Gen replica was built without a T3 handle", code="s3gen_error")
        entered = time.monotonic()
        conds = await self.conds.get(job.voice_id)
        self._ensure_loop()
        first_step = self.scheduler.first_step_tokens(job.first_step_tokens, job.t3_block_tokens)
        light = first_step < job.first_step_tokens   # only the idle-replica rule makes it shorter than asked
        if job.streaming:
            size = "light" if light else ("asked" if first_step == job.first_step_tokens else "grown")
            self._metrics.s3gen_first_steps_total.inc(1, tags={**self._tags, "size": size})
        stream = VocodeStream(job.request_id, conds, job.params.seed, streaming=job.streaming,
                              first_step_tokens=first_step, step_tokens=job.step_tokens, light_first_step=light)
        stream.marks.update(entered=entered, conds=time.monotonic())
        self.scheduler.add(stream)
        out: asyncio.Queue = asyncio.Queue()
        self._outputs[job.request_id] = out
        self._set_gauge()
        t3_job = T3Job(job.request_id, job.text, job.voice_id, job.params,
                       first_block_tokens=first_step + LOOKAHEAD_TOKENS if job.streaming else 1 << 30,
                       block_tokens=job.t3_block_tokens if job.streaming else 1 << 30, priority=job.priority)
        feeder = asyncio.create_task(self._feed(stream, t3_job))
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # bookkeeping first: a second cancellation during the await below must not leak the stream
            self.scheduler.remove(job.request_id)
            finish = stream.finish_reason or "incomplete"
            self._metrics.s3gen_chunks_total.inc(1, tags={**self._tags, "finish": finish})
            if stream.steps:   # what the scheduler did with this text chunk: (new tokens, why) per step
                log.info("%s: %d tokens vocoded in %d steps (%s): %s", job.request_id, stream.num_vocoded,
                         len(stream.steps), finish, " ".join(f"{n}:{why}" for n, why in stream.steps))
            self._outputs.pop(job.request_id, None)
            self._set_gauge()
            feeder.cancel()
            try:   # shielded: the feeder's cleanup (cancelling the T3 call) finishes even if we are cancelled again
                await asyncio.shield(asyncio.gather(feeder, return_exceptions=True))
            except asyncio.CancelledError:
                pass

    async def _feed(self, stream: VocodeStream, job: T3Job) -> None:
        """T3's token blocks into the stream; T3's end (or failure) too."""
        t3 = self._t3.stream("generate", job)
        try:
            async for chunk in t3:
                chunk: TokenChunk
                self.scheduler.observe_block(stream, len(chunk.tokens), time.monotonic())
                stream.tokens.extend(chunk.tokens)
                if chunk.tokens and "t3" not in stream.marks:
                    stream.marks["t3"] = time.monotonic()
                    stream.t3_timings = chunk.timings
                if chunk.finished:
                    if chunk.finish_reason == "error":
                        raise StageError(f"T3 failed on text chunk {job.request_id}.", code="t3_error")
                    if chunk.finish_reason == "length":
                        log.info("%s: T3 hit max_new_tokens=%d", job.request_id, job.params.max_new_tokens)
                    stream.finish_reason = chunk.finish_reason or "stop"
                    stream.t3_finished = True
                self._wake.set()
                if chunk.finished:
                    return
            raise StageError(f"T3 stream of {job.request_id} ended without finishing", code="t3_error")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the request's generator raises it
            q = self._outputs.get(stream.request_id)
            if q is not None:
                q.put_nowait(exc)
        finally:
            await t3.aclose()

    # ---- the replica's vocoder loop -----------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        loop, backend, wake = asyncio.get_running_loop(), self.backend, self._wake   # (backend: new stream states)
        while True:
            timeout = self.scheduler.next_wakeup(time.monotonic())
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            plans = self.scheduler.take_ready(time.monotonic())
            if not plans:
                continue
            cost = self.scheduler.step_cost(plans)   # before the step: a plan's new tokens are counted from the stream
            items = [VocodeItem(p.tokens, p.stream.conds, p.stream.seed, p.finalize,
                                None if not p.stream.streaming else
                                (p.stream.state if p.stream.state is not None else backend.new_stream_state()),
                                p.stream.request_id)
                     for p in plans]
            taken = time.monotonic()
            done: dict[int, tuple] = {}        # plan index -> (audio, state), as the step hands them out
            new = [0]                          # new tokens vocoded (a cell: the per-call delivery adds to it)

            def deliver(group: list[tuple[int, tuple]]) -> None:   # on the event loop's thread
                now = time.monotonic()
                for i, result in group:
                    done[i] = result
                    new[0] += self._deliver(plans[i], *result, taken, now)

            per_call = self.settings.deliver_per_call and hasattr(backend, "vocode_batch_groups")
            try:
                results = await loop.run_in_executor(self._executor, self._step, items,
                                                     (lambda g: loop.call_soon_threadsafe(deliver, g))
                                                     if per_call else None)
                if results is not None:
                    deliver(list(enumerate(results)))
            except Exception as exc:  # noqa: BLE001 - the step's streams fail, the replica goes on
                await asyncio.sleep(0)   # calls already handed out (per_call) are delivered first
                log.exception("S3Gen step of %d streams failed", len(plans))
                for i, p in enumerate(plans):
                    if i in done:
                        continue
                    p.stream.running = False
                    p.stream.done = True
                    q = self._outputs.get(p.stream.request_id)
                    if q is not None:
                        q.put_nowait(StageError(f"vocoding failed: {exc}", code="s3gen_error"))
                continue
            await asyncio.sleep(0)       # the last call_soon_threadsafe delivery runs before the step is booked
            seconds = time.monotonic() - taken
            self.scheduler.observe_step(seconds, cost)
            for reason, n in Counter(p.reason for p in plans).items():
                self._metrics.s3gen_stream_steps_total.inc(n, tags={**self._tags, "reason": reason})
            self._record_step(len(plans), new[0], sum(int(a.size) for a, _ in done.values()), seconds)
            wake.set()   # blocks that arrived during the step

    def _deliver(self, p: StepPlan, audio, state, taken: float, now: float) -> int:
        """A stream's result of a step: its state and the scheduler's books, its audio block to the caller.
        -> new tokens vocoded."""
        s = p.stream
        s.state = state
        num_before = s.num_vocoded
        first_audio = s.streaming and s.first_audio_at is None and audio.size > 0
        self.scheduler.finish_step(p, int(audio.size), now, getattr(state, "num_tokens_vocoded", None))
        num_new = s.num_vocoded - num_before
        q = self._outputs.get(s.request_id)
        if q is not None and (audio.size or p.finalize):   # (None: the caller went away during the step)
            q.put_nowait(AudioBlock(s.request_id, audio, num_speech_tokens=num_new, finished=p.finalize,
                                    finish_reason=s.finish_reason if p.finalize else None,
                                    timings=first_audio_timings(s.marks, taken, now, s.t3_timings)
                                    if first_audio else None))
        return num_new

    def _step(self, items: list[VocodeItem], hand_out: Any = None) -> list | None:
        """One engine step, in the worker thread (where the profiler, when on, records it).
        hand_out: each flow call's results go to it as they are ready (`vocode_batch_groups`); -> None then."""
        if hand_out is None:
            results = self.backend.vocode_batch(items)
        else:
            results = None
            for group in self.backend.vocode_batch_groups(items):
                hand_out(group)
        self._profiler.step_done(len(items))
        return results

    def _record_step(self, num_streams: int, num_new: int, num_samples: int, seconds: float) -> None:
        m, tags = self._metrics, self._tags
        m.s3gen_batch_seconds.observe(seconds, tags=tags)
        m.s3gen_batch_size.observe(num_streams, tags=tags)
        m.s3gen_batch_tokens.observe(num_new, tags=tags)
        for counter, value in ((m.s3gen_busy_seconds_total, seconds), (m.s3gen_speech_tokens_total, num_new),
                               (m.s3gen_step_streams_total, num_streams)):
            if value > 0:   # Ray's Counter.inc refuses 0
                counter.inc(value, tags=tags)
        stats = self.backend.stats() if hasattr(self.backend, "stats") else None
        if stats is not None:
            self._totals.export([(counter, key, stats.get(key)) for counter, key in (
                (m.s3gen_flow_tokens_total, "num_flow_tokens"), (m.s3gen_flow_row_tokens_total, "num_flow_row_tokens"),
                (m.s3gen_flow_padded_tokens_total, "num_flow_padded_tokens"),
                (m.s3gen_flow_calls_total, "num_flow_calls"),
                (m.s3gen_graph_captures_total, "num_graph_captures"))])
        if num_samples:
            m.audio_seconds_total.inc(num_samples / SAMPLE_RATE, tags={"stage": "s3gen"})

    def _set_gauge(self) -> None:
        self._metrics.s3gen_queue_depth.set(len(self.scheduler), tags=self._tags)

    def reconfigure(self, user_config: dict) -> None:
        cfg = S3GenUserConfig.model_validate(user_config or {})
        fields = cfg.model_dump()   # the user_config is the policy's knobs, one name apart
        fields["max_batch_new_tokens"] = fields.pop("max_batch_tokens")
        self.scheduler.policy = VocodePolicy(**fields)
        self._user_config = cfg.model_dump()
        log.info("S3Gen stage user_config: %s", cfg.model_dump())

    def invalidate_voice(self, voice_id: str) -> None:
        self.conds.invalidate(voice_id)

    def memory_report(self) -> dict:
        return {**self.rd.memory_report(), "backend": self.backend.name, "num_streams": len(self.scheduler),
                "max_batch_tokens": self.scheduler.policy.max_batch_new_tokens, "user_config": self._user_config,
                "num_cached_voices": len(self.conds)}

    def check_health(self) -> None:
        self.rd.export_metrics()
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled():
            raise RuntimeError(f"S3Gen vocoder loop died: {task.exception()!r}")


S3GenStage = serve.deployment(S3GenReplica, name="S3GenStage")
