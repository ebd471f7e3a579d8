"""S3GenEngine: speech tokens -> 24 kHz audio, batched across requests, in fp32 / bf16 / fp16 / quantized flow.

    engine = S3GenEngine(s3gen, S3GenEngineConfig(dtype="bf16"))
    wavs = engine.vocode([VocodeInput(tokens, conds, seed=1), ...])           # one-shot, list[np.ndarray]
    audio, state = engine.vocode_stream_step(tokens_so_far, conds, None, finalize=False)  # streaming
    engine.stats                                                              # S3GenEngineStats: running counters

A stream step runs the flow on the voice prompt + a bounded left context + the new tokens (streaming.py), so a
stream costs O(its length); its StreamState (device tensors) is kept by the caller, in this process.
The engine takes an already built (and loaded) upstream S3Gen module and modifies it in place (dtype casts,
quantization). Enrollment modules (tokenizer, speaker encoder) are never used: strip them first in a
vocoder-only replica (`strip_enrollment_modules`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterator

import numpy as np
import torch

from .batching import padded_rows, plan_batches
from .config import (
    DTYPES, MEL_FRAMES_PER_TOKEN, PRE_LOOKAHEAD_TOKENS, SAMPLES_PER_MEL_FRAME, S3GenEngineConfig, VocodeInput,
)
from .flow import FlowRow, FlowRunner, cosine_t_span, use_sync_free_masks
from .estimator import FastEstimator, supports
from .graphs import ShapeGraphs, SteppedFlowGraphs
from .noise import NoiseBank
from .stats import S3GenEngineStats
from .streaming import (
    StreamState, apply_trim_fade, context_frames, crossfade, is_fresh, keep_frames, to_numpy, trim_fade,
    window_start,
)
from .transfer import to_device
from .vocoder import HiftRow, HiftRunner, fold_weight_norm

log = logging.getLogger(__name__)


class S3GenEngine:
    def __init__(self, s3gen: torch.nn.Module, config: S3GenEngineConfig | None = None):
        self.config = config = config or S3GenEngineConfig()
        self.s3gen = s3gen.eval()
        self.device = torch.device(config.device or next(s3gen.flow.parameters()).device)
        flow, hift = s3gen.flow, s3gen.mel2wav
        flow.to(self.device)
        hift.to(self.device)
        # dtype: estimator (bulk of the work) in config.dtype; the rest fp32 unless configured
        flow.decoder.estimator.to(DTYPES[config.dtype])
        flow.encoder.to(DTYPES[config.encoder_dtype])
        hift.to(DTYPES[config.hift_dtype])
        folded = fold_weight_norm(hift)
        self.quantized: list[str] = []
        if config.quant is not None and getattr(config.quant, "method", "none") != "none":
            from quant.apply import apply_quant  # optional dependency, only when asked for

            q = config.quant
            if q.method == "dynamic_int8" and (config.dtype, config.encoder_dtype) != ("fp32", "fp32"):
                raise ValueError("dynamic_int8 computes in fp32: set the S3Gen dtype to fp32")
            # each part keeps its own compute dtype (config.encoder_dtype, config.dtype)
            for part, dtype in ((flow.encoder, config.encoder_dtype), (flow.decoder.estimator, config.dtype)):
                spec = dataclasses.replace(q, dtype=dtype)
                self.quantized += apply_quant(part, spec)
            log.info("quantized %d flow modules with %s", len(self.quantized), config.quant)
        self.noise = NoiseBank(self.device)
        use_sync_free_masks()
        est = flow.decoder.estimator
        estimator_fn = FastEstimator(est) if config.fast_estimator and supports(est) else est
        dynamic = config.compile_dynamic
        when = "once for all shapes" if dynamic else "on first use of each shape"
        if config.compile:
            estimator_fn = torch.compile(estimator_fn, dynamic=dynamic)
            log.info("CFM estimator wrapped in torch.compile (compiles %s)", when)
        self.flow = FlowRunner(flow, self.noise, DTYPES[config.dtype], DTYPES[config.encoder_dtype],
                               config.cfg_rate, estimator_fn)
        self.hift = HiftRunner(hift, DTYPES[config.hift_dtype], config.hift_length_bucket)
        if config.compile_hift:
            self.hift.trunk_fn = torch.compile(self.hift.trunk, dynamic=dynamic)
            log.info("HiFT trunk wrapped in torch.compile (compiles %s)", when)
        # bnb int8 with outliers (threshold > 0) syncs on the host: not capturable
        method = getattr(config.quant, "method", "none")
        capturable = method != "dynamic_int8" and not (method == "int8" and config.quant.int8_threshold > 0)
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager and capturable
        if self.use_graphs and config.flow_graph_unit == "step":
            self.flow.graphs = SteppedFlowGraphs(self.flow.core, self.flow.prologue, self.flow.euler_step,
                                                 cosine_t_span, config.graph_batch_sizes, config.max_graphs,
                                                 config.graph_capture_after, name="flow",
                                                 max_size=config.graph_max_tokens)
        elif self.use_graphs:
            self.flow.graphs = ShapeGraphs(self.flow.core, config.graph_batch_sizes, config.max_graphs,
                                           config.graph_capture_after, name="flow", max_size=config.graph_max_tokens)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.hift.graphs = ShapeGraphs(self.hift.trunk_fn, config.graph_batch_sizes, config.max_graphs,
                                           config.graph_capture_after, name="HiFT trunk",
                                           max_size=config.hift_graph_max_frames)
        log.info("S3Gen engine: estimator %s (%s), flow graphs %s, HiFT graphs %s (%d weight-normed convs folded)",
                 config.dtype, type(estimator_fn).__name__, self.flow.graphs is not None,
                 self.hift.graphs is not None, folded)
        self._trim_fade = trim_fade().to(self.device)
        self.stats = S3GenEngineStats()      # running counters, read by the serving layer

    # ---- conditioning ---------------------------------------------------------------------------------
    def prepare_conds(self, conds: Any) -> dict:
        """VoiceConds (numpy) or an upstream gen dict -> gen dict on the engine device (cache it per voice)."""
        from .conds import gen_dict_from_voice_conds

        if isinstance(conds, dict):
            gen = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in conds.items()}
        else:
            gen = gen_dict_from_voice_conds(conds, self.device)
        # a length is host metadata: kept on the CPU, `_row` reads it without waiting for the GPU at every step
        if torch.is_tensor(gen.get("prompt_token_len")):
            gen["prompt_token_len"] = gen["prompt_token_len"].cpu()
        return gen

    def _row(self, inp: VocodeInput, finalize: bool, start: int = 0,
             context_mel: torch.Tensor | None = None, keep_prompt: int | None = None) -> FlowRow:
        """The flow's row for speech tokens [start:] of `inp` (a stream step's window: `context_mel` [80, N] are
        the condition frames of its first tokens, and its noise is read 2 start frames further on)."""
        c = inp.conds
        toks = inp.speech_tokens
        if not isinstance(toks, (list, tuple)):
            toks = toks.reshape(-1) if torch.is_tensor(toks) else np.asarray(toks).reshape(-1)
        window = toks[start:]                             # sliced first: host work is O(window), not O(stream)
        tokens = window if torch.is_tensor(window) else torch.as_tensor(np.asarray(window))       # [T]
        vocab = self.flow.flow.vocab_size
        if tokens.numel() and int(tokens.max()) >= vocab:   # checked here, on the host, not inside the flow
            raise ValueError(f"speech token >= {vocab} (a special token) reached the flow; drop them first")
        tokens = to_device(tokens, self.device, torch.long)
        prompt = c["prompt_token"].reshape(-1)
        plen = c.get("prompt_token_len")
        if plen is not None:
            prompt = prompt[:int(torch.as_tensor(plen).reshape(-1)[0])]
        feat = c["prompt_feat"]
        feat = feat.reshape(feat.shape[-2], feat.shape[-1])                                   # [F, 80]
        drop = 0 if keep_prompt is None else max(0, int(prompt.shape[0]) - keep_prompt)
        if drop:   # a stream step keeps the voice prompt's last tokens and their frames (F stays 2P or 2P+1)
            prompt, feat = prompt[drop:], feat[MEL_FRAMES_PER_TOKEN * drop:]
        return FlowRow(
            tokens=tokens,
            prompt_token=prompt.to(self.device, torch.long),
            prompt_feat=feat.to(self.device, torch.float32),
            embedding=c["embedding"].reshape(-1).to(self.device, torch.float32),
            seed=self.config.default_seed if inp.seed is None else int(inp.seed),
            finalize=finalize,
            context_mel=context_mel,
            noise_offset=MEL_FRAMES_PER_TOKEN * (start + drop),   # new frames keep their one-shot noise
        )

    def _plan_row(self, inp: VocodeInput) -> tuple[FlowRow, bool, int]:
        """-> (the flow row, whether the request streams, the first speech token of its window)."""
        st = inp.stream_state
        streaming = not (inp.finalize and st is None)
        if not streaming or is_fresh(st):
            return self._row(inp, inp.finalize, keep_prompt=self.config.prompt_tokens), streaming, 0
        if st.finished:
            raise ValueError("this stream was finalized already; start a new one with stream_state=StreamState()")
        start = window_start(st.num_tokens_vocoded, st.num_mel_frames_emitted, self.config.stream_context_tokens)
        keep = [k for k in (self.config.stream_prompt_tokens, self.config.prompt_tokens) if k is not None]
        return self._row(inp, inp.finalize, start, context_frames(st, start),
                         min(keep, default=None)), True, start

    # ---- the batched core -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: list[VocodeInput]) -> list[tuple[np.ndarray, StreamState | None]]:
        """One-shot and streaming requests in one call. -> per input (new audio [N] float32, state).
        One-shot (finalize=True, stream_state=None): all audio, state None. Streaming: the audio since the last
        call and the state to pass next time (stream_state=StreamState() or None on the first call of a stream
        that is marked streaming by finalize=False). `speech_tokens` is always the stream's whole prefix; the
        flow runs on the window the state's counters select (streaming.py)."""
        if not batch:
            return []
        t0 = time.perf_counter()
        planned, rows, results, todo = self._plan(batch)
        mels: dict[int, torch.Tensor] = {}
        cfg, buckets = self.config, self._batch_buckets()
        flow_plan = self._flow_plan(rows, todo, buckets)
        for idx, padded in flow_plan:
            sel = [todo[j] for j in idx]
            for i, mel in zip(sel, self.flow([rows[i] for i in sel], padded, cfg.n_cfm_timesteps)):
                mels[i] = mel                                                                  # [80, N_i]
        self._vocode(batch, planned, rows, mels, todo, results)
        audio = self._to_host([a for a, _ in results])                                  # one transfer a step
        self._count(batch, planned, rows, todo, flow_plan, buckets, t0)
        return [(a, st) for a, (_, st) in zip(audio, results)]

    @torch.inference_mode()
    def step_groups(self, batch: list[VocodeInput]
                    ) -> Iterator[list[tuple[int, tuple[np.ndarray, StreamState | None]]]]:
        """`step`'s work and results, handed out one flow call at a time: each yield is [(input index, (audio,
        state))] for the rows of one flow call, vocoded and on the host, so a caller can pass them on while the
        next call runs. Calls go in the order of their earliest input (put the most urgent first); rows with
        nothing new come with the first. The same audio and states as `step`; one host transfer a call."""
        if not batch:
            return
        t0 = time.perf_counter()
        planned, rows, results, todo = self._plan(batch)
        cfg, buckets = self.config, self._batch_buckets()
        flow_plan = self._flow_plan(rows, todo, buckets)
        groups = sorted((sorted(todo[j] for j in idx), padded) for idx, padded in flow_plan)   # earliest input first
        running = set(todo)
        first = [i for i in range(len(batch)) if i not in running]                       # nothing new
        if not groups and first:
            groups = [([], 0)]
        for g, (sel, padded) in enumerate(groups):
            mels = dict(zip(sel, self.flow([rows[i] for i in sel], padded, cfg.n_cfm_timesteps))) if sel else {}
            self._vocode(batch, planned, rows, mels, sel, results)
            out = sorted(sel + (first if g == 0 else []))
            audio = self._to_host([results[i][0] for i in out])                        # one transfer a call
            if g == len(groups) - 1:
                self._count(batch, planned, rows, todo, flow_plan, buckets, t0)
            yield [(i, (a, results[i][1])) for i, a in zip(out, audio)]

    def _flow_plan(self, rows: list[FlowRow], todo: list[int], buckets: tuple[int, ...]) -> list[tuple[list[int], int]]:
        """The flow calls of the rows `todo` (batching.plan_batches): [(indices into todo, padded length)]."""
        cfg = self.config
        return plan_batches([rows[i].num_tokens for i in todo], cfg.max_batch_tokens, cfg.length_bucket, buckets,
                            cfg.batch_overhead_tokens, cfg.graph_max_tokens)

    def _plan(self, batch: list[VocodeInput]) -> tuple[list, list[FlowRow], list, list[int]]:
        """-> (per input (row, streaming, window start), the flow rows, results with the rows that have nothing new
        filled in, the inputs that run the flow)."""
        K = self.config.stream_overlap_frames
        planned = [self._plan_row(inp) for inp in batch]
        rows = [r for r, _, _ in planned]
        results: list[tuple[torch.Tensor, StreamState | None] | None] = [None] * len(batch)
        # requests that cannot produce new audio yet skip the flow
        todo = []
        for i, (inp, (row, streaming, _)) in enumerate(zip(batch, planned)):
            fresh = is_fresh(inp.stream_state)
            n_new = row.num_out_frames
            enough = n_new > K if fresh else n_new >= K
            if n_new == 0 or (streaming and not inp.finalize and not enough):
                results[i] = self._nothing_new(inp, streaming)
            else:
                todo.append(i)
        return planned, rows, results, todo

    def _vocode(self, batch: list[VocodeInput], planned: list, rows: list[FlowRow], mels: dict[int, torch.Tensor],
                sel: list[int], results: list) -> None:
        """HiFT for inputs `sel` (their new mel frames in `mels`), in groups of similar length; fills `results`."""
        cfg, K = self.config, self.config.stream_overlap_frames
        hift_rows: dict[int, HiftRow] = {}
        for i in sel:
            inp, st, seed = batch[i], batch[i].stream_state, rows[i].seed
            if not planned[i][1] or is_fresh(st):
                n_frames = int(mels[i].shape[1])
                hift_rows[i] = HiftRow(mels[i], seed, phase_at=self._phase_at(inp, n_frames, 0))
            else:
                start = st.num_mel_frames_emitted              # the K overlap frames come from the state's mel
                n_frames = start + int(mels[i].shape[1])
                hift_rows[i] = HiftRow(torch.cat([st.context_mel[:, -K:], mels[i]], dim=1), seed, st.cache_source,
                                       sample_offset=(start - K) * SAMPLES_PER_MEL_FRAME, phase0=st.source_phase,
                                       phase_at=self._phase_at(inp, n_frames, start - K))
        # HiFT in groups of similar length (frames are ~2x tokens; reuse the flow plan's budget)
        hift_lens = [int(hift_rows[i].mel.shape[1]) for i in sel]
        hift_buckets = self.hift.graphs.batch_buckets if self.hift.graphs is not None else ()
        for idx, _ in plan_batches(hift_lens, 2 * cfg.max_batch_tokens, cfg.hift_length_bucket, hift_buckets,
                                   2 * cfg.batch_overhead_tokens, cfg.hift_graph_max_frames):
            group = [sel[j] for j in idx]
            wavs, srcs, phases = self.hift([hift_rows[i] for i in group])
            for i, wav, src, ph in zip(group, wavs, srcs, phases):
                results[i] = self._finish(batch[i], planned[i][1], planned[i][2], rows[i], mels[i], wav, src, ph)

    def _count(self, batch: list[VocodeInput], planned: list, rows: list[FlowRow], todo: list[int],
               flow_plan: list, buckets: tuple[int, ...], t0: float) -> None:
        """A finished step's work into the running counters."""
        cfg, stats = self.config, self.stats
        stats.num_steps += 1
        stats.num_flow_rows += len(todo)
        stats.num_flow_tokens += sum(int(rows[i].tokens.shape[0]) for i in todo)
        stats.num_flow_calls += len(flow_plan)
        stats.num_flow_row_tokens += sum(rows[i].num_tokens for i in todo)
        stats.num_flow_padded_tokens += sum(padded_rows(len(idx), buckets, padded, cfg.graph_max_tokens) * padded
                                            for idx, padded in flow_plan)
        stats.num_tokens_in += sum(self._num_tokens_in(batch[i], rows[i], planned[i][2]) for i in todo)
        stats.busy_seconds += time.perf_counter() - t0

    def num_graph_captures(self) -> int:
        """CUDA graphs captured so far, flow and HiFT."""
        return sum(g.captures for g in (self.flow.graphs, self.hift.graphs) if g is not None)

    def _batch_buckets(self) -> tuple[int, ...]:
        """The batch sizes flow calls are padded to (graph buckets), () when the flow runs eagerly."""
        return self.flow.graphs.batch_buckets if self.use_graphs and self.flow.graphs is not None else ()

    @staticmethod
    def _num_tokens_in(inp: VocodeInput, row: FlowRow, start: int) -> int:
        """New speech tokens whose frames this step produced."""
        held = 0 if row.finalize else PRE_LOOKAHEAD_TOKENS
        before = 0 if is_fresh(inp.stream_state) else inp.stream_state.num_tokens_vocoded
        return start + int(row.tokens.shape[0]) - held - before

    @staticmethod
    def _to_host(pieces: list[torch.Tensor]) -> list[np.ndarray]:
        # pieces: [N_i] float32 on the device -> numpy float32 [N_i], through one device -> host copy
        sizes = [int(p.shape[0]) for p in pieces]
        if not any(sizes):
            return [np.zeros(0, np.float32) for _ in pieces]
        flat = to_numpy(torch.cat([p.reshape(-1).float() for p in pieces]))
        return list(np.split(flat, np.cumsum(sizes)[:-1]))

    def _phase_at(self, inp: VocodeInput, n_frames: int, first_frame: int) -> int | None:
        """Local sample index where the next stream chunk's HiFT input will start (None: no next chunk)."""
        if inp.finalize:
            return None
        return (n_frames - self.config.stream_overlap_frames - first_frame) * SAMPLES_PER_MEL_FRAME

    def _nothing_new(self, inp: VocodeInput, streaming: bool) -> tuple[torch.Tensor, StreamState | None]:
        empty = torch.zeros(0, device=self.device)
        if not streaming:
            return empty, None
        st = inp.stream_state if inp.stream_state is not None else StreamState()
        if not inp.finalize:
            return empty, st
        # flush what was held back for the crossfade
        tail = st.tail_audio if st.tail_audio is not None else empty
        return tail, dataclasses.replace(st, num_samples_emitted=st.num_samples_emitted + int(tail.shape[0]),
                                         context_mel=None, tail_audio=None, cache_source=None, source_phase=None,
                                         finished=True)

    def _finish(self, inp: VocodeInput, streaming: bool, start: int, row: FlowRow, mel: torch.Tensor,
                wav: torch.Tensor, src: torch.Tensor, phase: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, StreamState | None]:
        # mel: [80, n] the new frames; wav, src: [480 M] for the vocoded frames (M = n, or K + n continuing)
        if not streaming:
            return apply_trim_fade(wav, self._trim_fade), None
        K = self.config.stream_overlap_frames
        n_ov = K * SAMPLES_PER_MEL_FRAME
        st = inp.stream_state if inp.stream_state is not None else StreamState()
        fresh = is_fresh(st)
        if fresh:
            wav = apply_trim_fade(wav, self._trim_fade)
        else:
            wav = wav.clone()
            wav[:n_ov] = crossfade(wav[:n_ov], st.tail_audio)
        held = 0 if inp.finalize else PRE_LOOKAHEAD_TOKENS
        counts = dict(num_tokens_vocoded=start + int(row.tokens.shape[0]) - held,
                      num_mel_frames_emitted=(0 if fresh else st.num_mel_frames_emitted) + int(mel.shape[1]))
        if inp.finalize:
            return wav, StreamState(**counts, num_samples_emitted=st.num_samples_emitted + int(wav.shape[0]),
                                    finished=True)
        keep = keep_frames(self.config.stream_context_tokens, K)
        context = mel if fresh else torch.cat([st.context_mel, mel], dim=1)
        out = wav[:-n_ov]
        # clones: the state must not keep the step's batched buffers alive
        return out, StreamState(**counts, num_samples_emitted=st.num_samples_emitted + int(out.shape[0]),
                                context_mel=context[:, -keep:].clone(), tail_audio=wav[-n_ov:].clone(),
                                cache_source=src[-n_ov:].clone(),
                                source_phase=None if phase is None else phase.clone())

    def warmup(self, conds: dict, first_chunk_tokens: int = 25, batch_sizes: tuple[int, ...] = (1,),
               progress: bool = True) -> int:
        """Run the first streamed chunk of `batch_sizes` new streams with this voice's prompt until its CUDA
        graphs are captured, so a replica's first requests replay graphs instead of paying for captures.
        (Graphs key on shapes: other voices with a prompt in the same length bucket hit them too.)
        -> engine steps run."""
        from tqdm import tqdm

        conds = self.prepare_conds(conds)
        rng = np.random.default_rng(0)
        reps = self.config.graph_capture_after if self.use_graphs else 1
        todo = [b for b in batch_sizes for _ in range(reps)]
        for b in tqdm(todo, desc="S3Gen warm-up (first-chunk graphs)", unit="step", disable=not progress):
            self.step([VocodeInput(rng.integers(0, 6561, first_chunk_tokens), conds, seed=i, finalize=False,
                                   stream_state=StreamState()) for i in range(b)])
        log.info("S3Gen warm-up: %d steps, first chunk of %d tokens at batch sizes %s; %d flow / %d HiFT graphs",
                 len(todo), first_chunk_tokens, list(batch_sizes),
                 len(self.flow.graphs.graphs) if self.flow.graphs else 0,
                 len(self.hift.graphs.graphs) if self.hift.graphs else 0)
        return len(todo)

    def capture_graphs(self, max_tokens: int, max_frames: int, min_tokens: int = 0, progress: bool = True) -> int:
        """Capture ahead of traffic the flow graphs of every (graph batch bucket, length bucket) up to
        `max_tokens` long (from `min_tokens`) and the HiFT graphs up to `max_frames`, within the graph size
        limits, so that serving replays graphs instead of capturing them between users' steps (a capture costs
        about two eager calls and holds up every stream of the step). -> graphs captured."""
        from tqdm import tqdm

        if self.flow.graphs is None and self.hift.graphs is None:
            return 0
        cfg, dev, fg, hg = self.config, self.device, self.flow.graphs, self.hift.graphs
        first = max(cfg.length_bucket, -(-min_tokens // cfg.length_bucket) * cfg.length_bucket)
        flow_shapes = [(b, L) for L in range(first, max_tokens + 1, cfg.length_bucket)
                       for b in fg.batch_buckets if b * L <= cfg.graph_max_tokens] if fg is not None else []
        fb = self.hift.length_bucket
        hift_shapes = [(b, M) for M in range(fb, max_frames + 1, fb)
                       for b in hg.batch_buckets if b * M <= cfg.hift_graph_max_frames] if hg is not None else []
        g = torch.Generator(device="cpu").manual_seed(0)
        n = 0
        with torch.inference_mode():
            for b, L in tqdm(flow_shapes, desc="S3Gen flow graphs", unit="graph", disable=not progress):
                rows = [FlowRow(tokens=torch.randint(0, 6561, (L,), generator=g).to(dev),
                                prompt_token=torch.zeros(0, dtype=torch.long, device=dev),
                                prompt_feat=torch.zeros(0, 80, device=dev),
                                embedding=torch.randn(192, generator=g).to(dev), seed=i) for i in range(b)]
                n += fg.capture(self.flow.prepare(rows, L), n_steps=cfg.n_cfm_timesteps)
            hd, n_fft, hop = self.hift.dtype, self.hift.n_fft, self.hift.hop
            for b, M in tqdm(hift_shapes, desc="S3Gen HiFT graphs", unit="graph", disable=not progress):
                TT = M * SAMPLES_PER_MEL_FRAME // hop + 1
                inputs = dict(mel=(0.1 * torch.randn(b, 80, M, generator=g)).to(dev, hd),
                              lengths=torch.full((b,), M, dtype=torch.long, device=dev),
                              s_stft=(0.1 * torch.randn(b, n_fft + 2, TT, generator=g)).to(dev, hd))
                n += hg.capture(inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        log.info("S3Gen graphs captured ahead of traffic: %d (flow: %d shapes up to %d tokens, HiFT: %d up to %d "
                 "frames)", n, len(flow_shapes), max_tokens, len(hift_shapes), max_frames)
        return n

    # ---- API --------------------------------------------------------------------------------------------
    def vocode(self, batch: list[VocodeInput]) -> list[np.ndarray]:
        """One-shot decode of whole token sequences. -> per input audio [960 T - prompt spill] float32 at 24 kHz
        (2 mel frames per token, 480 samples per frame; upstream's length)."""
        inputs = [VocodeInput(b.speech_tokens, b.conds, b.seed) for b in batch]
        return [audio for audio, _ in self.step(inputs)]

    def vocode_stream_step(self, tokens_so_far, conds: dict, state: StreamState | None, finalize: bool,
                           seed: int | None = None) -> tuple[np.ndarray, StreamState]:
        """Streaming: the whole token prefix so far -> (new audio [N] float32, state for the next call).
        Until `finalize` the last 3 tokens are held back (flow look-ahead) and the last overlap's audio too."""
        audio, new_state = self.step([VocodeInput(tokens_so_far, conds, seed, finalize,
                                                  state if state is not None else StreamState())])[0]
        return audio, new_state
