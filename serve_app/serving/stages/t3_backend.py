"""T3 backends: what turns a `T3Job` into a stream of speech tokens inside a T3 stage replica.

Two implementations of one contract (`T3Backend`):

- `UpstreamT3Backend`: upstream `T3.inference`, which is batch-1 by design, one request after another on a
  single worker thread. The whole token sequence arrives as one block when it is done.
- `EngineT3Backend`: our continuous-batching `T3Engine`; a background thread runs `engine.step()` while
  anything is unfinished, gathers each request's tokens into the job's blocks (`first_block_tokens`, then
  `block_tokens`) and hands a request's asyncio queue a block only when it is full: the event loop wakes per
  block, not per token and step. Closing a request's generator cancels it in the engine and frees its slot.

Neither imports Ray: the stage shim (`t3_stage.py`) owns batching knobs, metrics and handles.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

import torch

from serve_app.contracts import T3_FIRST_BLOCK_PHASES, T3Job, TokenChunk, VoiceConds
from serve_app.serving.stages.step_profiler import StepProfiler

log = logging.getLogger(__name__)

NUM_AUDIO_TOKENS = 6561   # speech tokens >= this are control tokens (start 6561, stop 6562)


class T3Backend(Protocol):
    name: str

    def prepare_conds(self, conds: VoiceConds) -> Any:
        """VoiceConds (numpy) -> what `generate` takes, on this replica's device (cached by the stage)."""

    def generate(self, job: T3Job, conds: Any, started: float | None = None) -> AsyncIterator[TokenChunk]:
        """Speech tokens for one text chunk in the job's blocks (`TokenBlocks`), the first with its `timings` from
        `started`; the last chunk has finished=True and a finish_reason."""

    def num_unfinished(self) -> int: ...

    def close(self) -> None: ...


def text_to_token_ids(tokenizer: Any, text: str, language: str | None, multilingual: bool) -> list[int]:
    """Upstream tokenization of one (already normalised) text chunk, without SOT/EOT."""
    if multilingual:
        ids = tokenizer.text_to_tokens(text, language_id=language.lower() if language else None)
    else:
        ids = tokenizer.text_to_tokens(text)
    return [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]


@dataclass
class _DeviceConds:
    speaker_emb: torch.Tensor                # [1, 256]
    cond_prompt_speech_tokens: torch.Tensor  # [1, P] int64
    emotion_adv: float


def _to_device_conds(vc: VoiceConds, device: str, dtype: torch.dtype) -> _DeviceConds:
    return _DeviceConds(
        speaker_emb=torch.from_numpy(vc.t3_speaker_emb).to(device=device, dtype=dtype).reshape(1, -1),
        cond_prompt_speech_tokens=torch.from_numpy(vc.t3_cond_prompt_speech_tokens).to(device=device).long(),
        emotion_adv=float(vc.t3_emotion_adv),
    )


def first_block_timings(started: float, first_token_at: float, now: float) -> dict[str, float]:
    """T3_FIRST_BLOCK_PHASES in seconds: from `started` to the first token, then to the first block's end."""
    return dict(zip(T3_FIRST_BLOCK_PHASES, (first_token_at - started, now - first_token_at)))


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class UpstreamT3Backend:
    """Upstream `T3.inference`, per request, on one worker thread (it is batch-1 and not thread-safe)."""

    name = "upstream"

    def __init__(self, t3: torch.nn.Module, tokenizer: Any, *, multilingual: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        self.t3 = t3
        self.tokenizer = tokenizer
        self.multilingual = multilingual
        self.dtype = dtype
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t3-upstream")
        self._num_unfinished = 0

    @property
    def device(self) -> str:
        return str(self.t3.device)

    def prepare_conds(self, conds: VoiceConds) -> _DeviceConds:
        return _to_device_conds(conds, self.device, self.dtype)

    def num_unfinished(self) -> int:
        return self._num_unfinished

    def _run(self, job: T3Job, conds: _DeviceConds, cancelled: threading.Event) -> tuple[list[int], str]:
        # runs on the worker thread
        if cancelled.is_set():
            return [], "cancelled"
        from chatterbox.models.t3.modules.cond_enc import T3Cond

        p = job.params
        ids = text_to_token_ids(self.tokenizer, job.text, p.language, self.multilingual)
        hp = self.t3.hp
        # text_tokens: [2, N+2] int64 (cond and uncond rows for CFG, as ChatterboxTTS.generate builds them)
        text = torch.tensor([hp.start_text_token, *ids, hp.stop_text_token], dtype=torch.long, device=self.device)
        text = text.unsqueeze(0).repeat(2, 1)
        cond = T3Cond(speaker_emb=conds.speaker_emb, cond_prompt_speech_tokens=conds.cond_prompt_speech_tokens,
                      emotion_adv=p.exaggeration * torch.ones(1, 1, 1, device=self.device, dtype=self.dtype))
        if p.seed is not None:
            torch.manual_seed(p.seed)
        with torch.inference_mode():
            out = self.t3.inference(t3_cond=cond, text_tokens=text, max_new_tokens=p.max_new_tokens,
                                    temperature=p.temperature, cfg_weight=p.cfg_weight,
                                    repetition_penalty=p.repetition_penalty, min_p=p.min_p, top_p=p.top_p)
        raw = out[0].tolist()                                         # [num_sampled] incl. a final stop token
        stopped = bool(raw) and raw[-1] == hp.stop_speech_token
        return [t for t in raw if t < NUM_AUDIO_TOKENS], ("stop" if stopped else "length")

    async def generate(self, job: T3Job, conds: _DeviceConds, started: float | None = None
                       ) -> AsyncIterator[TokenChunk]:
        cancelled = threading.Event()
        self._num_unfinished += 1
        try:
            loop = asyncio.get_running_loop()
            tokens, reason = await loop.run_in_executor(self._executor, self._run, job, conds, cancelled)
            yield TokenBlocks.of(job, started).add(tokens, True, reason, time.monotonic())
        finally:
            cancelled.set()   # a request still queued behind others is skipped
            self._num_unfinished -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_ENGINE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


CPU_MAX_BATCH_SIZE = 4   # KV slots of a CPU replica unless the stage's `engine` settings say otherwise


@dataclass
class TokenBlocks:
    """A request's tokens gathered into its job's blocks: the first `want` tokens, then at least `block_tokens`
    each, so a block (a Ray item, a wake-up of the event loop) carries many tokens, not one. The first block
    carries T3_FIRST_BLOCK_PHASES from `started` (time.monotonic(); None: no timings)."""

    request_id: str
    want: int                     # tokens that complete the block being filled
    block_tokens: int             # the size of every block after the first
    started: float | None
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    first_block: bool = True

    @classmethod
    def of(cls, job: T3Job, started: float | None) -> TokenBlocks:
        return cls(job.request_id, max(1, job.first_block_tokens), max(1, job.block_tokens), started)

    def add(self, tokens: list[int], finished: bool, reason: str | None, now: float) -> TokenChunk | None:
        """Adds new tokens; -> the block, when it is full or the request finished."""
        if tokens and self.first_token_at is None:
            self.first_token_at = now
        self.tokens.extend(tokens)
        if not (finished or len(self.tokens) >= self.want):
            return None
        timings = None
        if self.first_block and self.started is not None and self.first_token_at is not None:
            timings = first_block_timings(self.started, self.first_token_at, now)
        chunk = TokenChunk(self.request_id, self.tokens, finished=finished, finish_reason=reason, timings=timings)
        self.tokens, self.want, self.first_block = [], self.block_tokens, False
        return chunk


@dataclass
class _Stream:
    """One request of the engine backend: its event loop and queue, and its blocks (filled by the step thread)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    blocks: TokenBlocks


class EngineT3Backend:
    """Continuous batching with `serve_app.engine.t3.T3Engine`, stepped by one background thread.

    The event loop never touches the engine directly: adds and cancels are queued and applied by the step
    thread between steps; step outputs are handed back with `call_soon_threadsafe`.
    """

    name = "engine"

    def __init__(self, engine: Any, tokenizer: Any, *, multilingual: bool = False, device: str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 on_step: Callable[[float, int], None] | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.multilingual = multilingual
        self.device = device
        self.dtype = dtype
        self._on_step = on_step
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: list[tuple[str, Any]] = []           # ("add", request) | ("cancel", request_id)
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._profiler = StepProfiler.from_env("t3")
        self._thread = threading.Thread(target=self._loop, name="t3-engine-step", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, t3: torch.nn.Module, tokenizer: Any, *, multilingual: bool, device: str,
                   dtype: torch.dtype, max_batch_size: int, quant: Any = None, extra: dict | None = None,
                   on_step: Callable[[float, int], None] | None = None) -> EngineT3Backend:
        from serve_app.engine.t3 import T3Engine, T3EngineConfig

        kwargs = dict(max_batch_requests=max_batch_size, dtype=_ENGINE_DTYPES[dtype], device=device, quant=quant)
        if device == "cpu":
            kwargs["enforce_eager"] = True
            if max_batch_size > CPU_MAX_BATCH_SIZE:
                # fp32 KV slots on CPU cost ~0.75 GiB each at the full preset; a CPU gains little from batching
                log.info("T3 engine on CPU: %d KV slots instead of max_batch_size=%d (more requests queue)",
                         CPU_MAX_BATCH_SIZE, max_batch_size)
                kwargs["max_batch_requests"] = CPU_MAX_BATCH_SIZE
        kwargs.update(extra or {})
        return cls(T3Engine(t3, T3EngineConfig(**kwargs)), tokenizer, multilingual=multilingual, device=device,
                   dtype=dtype, on_step=on_step)

    def prepare_conds(self, conds: VoiceConds) -> Any:
        from serve_app.engine.t3.request import T3Conditioning

        dc = _to_device_conds(conds, self.device, self.dtype)
        return T3Conditioning(speaker_emb=dc.speaker_emb, cond_prompt_speech_tokens=dc.cond_prompt_speech_tokens,
                              emotion_adv=dc.emotion_adv)

    def num_unfinished(self) -> int:
        return len(self._streams)

    # -- step thread ---------------------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: Any) -> None:
        st = self._streams.get(request_id)
        if st is not None:
            st.loop.call_soon_threadsafe(st.queue.put_nowait, item)

    def _deliver_step(self, outputs: list) -> None:
        """A step's full blocks in one hop to the event loop (none when no block filled this step)."""
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for out in outputs:
            st = self._streams.get(out.request_id)
            chunk = st.blocks.add(out.new_tokens, out.finished, out.finish_reason, now) if st is not None else None
            if chunk is not None:
                by_loop.setdefault(st.loop, []).append((st.queue, chunk))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for op, arg in pending:
            try:
                if op == "add":
                    self.engine.add_request(arg)
                else:
                    self.engine.cancel(arg)
            except Exception as e:  # a bad request fails alone
                if op == "add":
                    self._deliver(arg.request_id, e)
                else:
                    log.warning("cancel(%s) failed: %r", arg, e)

    def _loop(self) -> None:
        while not self._stopped:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:
                log.exception("T3 engine step failed; failing every running request")
                for rid in list(self._streams):
                    self._deliver(rid, e)
                    try:
                        self.engine.cancel(rid)
                    except Exception:
                        log.exception("cancel(%s) after a failed step", rid)
                continue
            if self._on_step is not None:
                self._on_step(time.perf_counter() - t0, len(outputs))
            self._deliver_step(outputs)
            self._profiler.step_done(len(outputs))

    # -- event loop side -----------------------------------------------------------------------------------

    async def generate(self, job: T3Job, conds: Any, started: float | None = None) -> AsyncIterator[TokenChunk]:
        from serve_app.engine.t3.request import T3GenerationRequest

        p = job.params
        req = T3GenerationRequest(
            request_id=job.request_id,
            text_tokens=text_to_token_ids(self.tokenizer, job.text, p.language, self.multilingual),
            cond=conds, temperature=p.temperature, top_p=p.top_p, min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, cfg_weight=p.cfg_weight, exaggeration=p.exaggeration,
            seed=p.seed, max_new_tokens=p.max_new_tokens, priority=job.priority,
        )
        req.validate()
        if job.request_id in self._streams:
            raise ValueError(f"request id {job.request_id!r} is already running; use a unique id per text chunk")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[job.request_id] = _Stream(asyncio.get_running_loop(), q, TokenBlocks.of(job, started))
        finished = False
        with self._lock:
            self._pending.append(("add", req))
        self._wake.set()
        try:
            while not finished:
                items = [await q.get()]
                while not q.empty():          # blocks that arrived while the consumer was busy: one chunk
                    items.append(q.get_nowait())
                tokens: list[int] = []
                reason = timings = None
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    tokens.extend(item.tokens)
                    timings = timings or item.timings
                    if item.finished:
                        finished, reason = True, item.finish_reason
                        break
                if tokens or finished:
                    yield TokenChunk(job.request_id, tokens, finished=finished, finish_reason=reason,
                                     timings=timings)
        finally:
            self._streams.pop(job.request_id, None)
            if not finished:
                with self._lock:
                    self._pending.append(("cancel", job.request_id))
                self._wake.set()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
