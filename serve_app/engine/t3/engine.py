"""T3Engine: continuous-batching T3 decoding with paired CFG rows, a static slot KV cache and CUDA graphs.

One step = retire cancelled requests -> admit and prefill waiting ones (their first token) -> one decode step
for every running request (newly admitted included) -> ONE device->host copy of the sampled tokens -> host
bookkeeping (stop, length, retire). Nothing inside prefill or decode syncs with the host. Decode replays a CUDA
graph per (batch, KV-length) bucket; a request admitted alone prefills in a graph per prompt-length bucket,
several admitted together prefill eagerly (graph_runner.py).
"""
from __future__ import annotations

import logging
import random

import torch
from torch import nn

from .config import (NUM_AUDIO_TOKENS, START_SPEECH_TOKEN, STOP_SPEECH_TOKEN, T3EngineConfig,
                     graphs_unsupported_reason)
from .graph_runner import DecodeGraphs, PrefillGraphs, pick_bucket
from .llama import KVCache, LlamaBackbone
from .prompt import build_prompt_embeds, cond_embeds, prompt_len
from .request import T3GenerationRequest, T3StepOutput
from .sampling import make_vocab_hash, sample_tokens
from .scheduler import Scheduler
from .sequence import Sequence
from .slot_state import SlotState
from .stats import T3EngineStats

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SEED_MASK = (1 << 63) - 1
_MAX_COND_EMBEDS = 16   # exaggerations cached per voice


def _quantize_backbone(t3: nn.Module, config: T3EngineConfig, device: torch.device) -> list[str]:
    spec = config.quant
    if spec is None or getattr(spec, "method", "none") == "none":
        return []
    try:
        from quant.apply import apply_quant
    except ImportError as e:
        raise ImportError(f"config.quant={spec!r} needs quant.apply.apply_quant, which failed to import: {e}") from e
    spec_dtype = getattr(spec, "dtype", config.dtype)
    if spec_dtype != config.dtype:
        raise ValueError(f"QuantSpec.dtype={spec_dtype!r} differs from T3EngineConfig.dtype={config.dtype!r}; "
                         "set both to the same dtype")
    replaced = apply_quant(t3.tfmr, spec, device=device, name="t3.tfmr")  # bnb quantizes where the weights land
    logger.info("quantized %d backbone layers with %s", len(replaced), spec)
    return replaced


class T3Engine:
    """Takes ownership of an upstream `T3` module: casts it to config.dtype, quantizes its backbone in place
    (config.quant) and moves it to config.device."""

    def __init__(self, t3: nn.Module, config: T3EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        if config.attention == "padded_keys" and self.device.type != "cuda":
            raise ValueError("decode_attention='padded_keys' runs on CUDA only (the memory-efficient attention "
                             "kernel's variable-length mode); use 'masked'")
        reason = graphs_unsupported_reason(config.quant)
        if reason and self.use_graphs:
            raise ValueError(reason)
        if getattr(t3, "is_gpt", False):
            raise ValueError("T3Engine supports the Llama T3 backbone only (T3.is_gpt is True)")

        t3 = t3.eval().to(dtype=self.dtype)
        self.quantized_layers = _quantize_backbone(t3, config, self.device)
        self.t3 = t3.to(self.device)
        hp = t3.hp
        self.vocab_size = hp.speech_tokens_dict_size
        self.max_text_tokens = t3.text_pos_emb.emb.num_embeddings - 2  # without SOT/EOT
        self.max_speech_positions = t3.speech_pos_emb.emb.num_embeddings

        with torch.inference_mode():
            self.backbone = LlamaBackbone(t3.tfmr, config.max_seq_len, config.attention)
            # the decode step's backbone, compiled or not (prefill stays eager: one-request graphs cover it)
            self._backbone_decode = (torch.compile(self.backbone.decode, dynamic=True) if config.compile
                                     else self.backbone.decode)
            b = self.backbone
            self.cache = KVCache(b.num_layers, config.max_rows, b.num_heads, config.max_seq_len, b.head_dim,
                                 self.dtype, self.device)
            self.state = SlotState(config.max_batch_requests, self.vocab_size, self.device, START_SPEECH_TOKEN)
            self.vocab_hash = make_vocab_hash(self.vocab_size, self.device)  # [V]
            self.prefill_out = torch.zeros(config.max_prefill_requests, dtype=torch.int64, device=self.device)
            self.logits = torch.zeros(config.max_rows, self.vocab_size, dtype=torch.float32, device=self.device)
            # one-request prefill on static buffers (what the prefill graphs capture)
            hidden = t3.speech_emb.embedding_dim
            longest = config.prefill_buckets[-1] if config.prefill_buckets else 1
            self.prefill_x = torch.zeros(2, longest, hidden, dtype=self.dtype, device=self.device)  # [2, T, C]
            self.prefill_rows = torch.zeros(2, dtype=torch.int64, device=self.device)  # [2] cache rows
            self.prefill_last = torch.zeros(2, dtype=torch.int64, device=self.device)  # [2] last prompt position
            self.prefill_logits = torch.zeros(2, self.vocab_size, dtype=torch.float32, device=self.device)
            self._two = torch.arange(2, device=self.device)
        logger.info("T3 engine: %s %s, %d slots x %d positions, KV cache %.2f GiB, graphs=%s",
                    self.device, config.dtype, config.max_batch_requests, config.max_seq_len,
                    self.cache.num_bytes / 2**30, self.use_graphs)

        self.scheduler = Scheduler(config.max_batch_requests, config.max_prefill_requests)
        self.requests: dict[str, T3GenerationRequest] = {}
        self._seed_rng = random.Random()
        self._embeds_key = object()   # this engine's entries in a T3Conditioning's cache (alive while they are)
        self.stats = T3EngineStats()
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if self.use_graphs:
            self.graphs = DecodeGraphs(self._decode_forward, self._decode_sample, config.batch_buckets,
                                       config.seq_buckets)
            self.graphs.capture()
            if config.prefill_buckets:
                self.prefill_graphs = PrefillGraphs(self._prefill_forward, config.prefill_buckets)
                self.prefill_graphs.capture(self.graphs.pool)

    # ---- public API -------------------------------------------------------------------------------------

    def add_request(self, req: T3GenerationRequest) -> None:
        req.validate()
        if len(req.text_tokens) > self.max_text_tokens:
            raise ValueError(f"request {req.request_id!r}: {len(req.text_tokens)} text tokens exceed the model's "
                             f"{self.max_text_tokens}; split the text into shorter chunks")
        T = prompt_len(len(req.text_tokens))
        if T >= self.config.max_seq_len:
            raise ValueError(f"request {req.request_id!r}: prompt of {T} positions does not fit max_seq_len="
                             f"{self.config.max_seq_len}; split the text or raise max_seq_len")
        # The last sampled token is never fed back: positions used = T + max_new_tokens - 1.
        max_new = min(req.max_new_tokens, self.config.max_seq_len - T + 1, self.max_speech_positions - 1)
        if max_new < req.max_new_tokens:
            logger.warning("request %r: max_new_tokens %d capped to %d by max_seq_len=%d",
                           req.request_id, req.max_new_tokens, max_new, self.config.max_seq_len)
        self.scheduler.add(Sequence(req.request_id, T, max_new, -1 if req.ignore_stop else STOP_SPEECH_TOKEN,
                                    priority=req.priority))
        self.requests[req.request_id] = req

    def cancel(self, request_id: str) -> None:
        """The request is retired, and its slot freed, at the next step()."""
        if not self.scheduler.cancel(request_id):
            logger.debug("cancel(%r): not in flight", request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def step(self) -> list[T3StepOutput]:
        outputs = []
        for seq in self.scheduler.take_cancelled():
            if seq.slot >= 0:
                self.state.release(seq.slot)
            self.requests.pop(seq.request_id, None)
            outputs.append(T3StepOutput(seq.request_id, [], True, "cancelled"))

        admitted = self.scheduler.admit()
        if admitted:
            self._prefill(admitted)
        running = self.scheduler.running_seqs()
        num_slots = 0
        if running:
            num_slots = pick_bucket(self.config.batch_buckets, self.scheduler.num_decode_slots())
            lengths = [s.prompt_len + max(s.num_generated, 1) for s in running]
            kv_len = pick_bucket(self.config.seq_buckets, max(lengths))
            st = self.stats
            st.num_decode_steps += 1
            # padded slots (inactive) read one position each under padded_keys
            st.kv_positions_read += 2 * (sum(lengths) + num_slots - len(running)
                                         if self.config.attention == "padded_keys" else num_slots * kv_len)
            st.kv_positions_used += 2 * sum(lengths)
            if self.graphs is not None:
                self.graphs.run(num_slots, kv_len)
            else:
                self._decode(num_slots, kv_len)

        k = len(admitted)
        if k == 0 and num_slots == 0:
            return outputs
        host = torch.cat([self.prefill_out[:k], self.state.out_tokens[:num_slots]]).tolist()  # the one sync

        new_tokens: dict[str, list[int]] = {s.request_id: [] for s in running}
        for i, seq in enumerate(admitted):
            self._append(seq, host[i], new_tokens)
        for seq in running:
            if not seq.is_finished:
                self._append(seq, host[k + seq.slot], new_tokens)
        for seq in running:
            outputs.append(T3StepOutput(seq.request_id, new_tokens[seq.request_id], seq.is_finished,
                                        seq.finish_reason))
            if seq.is_finished:
                self.state.release(seq.slot)
                self.scheduler.retire(seq)
                self.requests.pop(seq.request_id, None)
        return outputs

    def generate(self, reqs: list[T3GenerationRequest]) -> dict[str, list[int]]:
        """Run the given requests (and anything already queued) to completion; returns their speech tokens."""
        for req in reqs:
            self.add_request(req)
        out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        while self.has_unfinished():
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id].extend(o.new_tokens)
        return out

    # ---- internals --------------------------------------------------------------------------------------

    @staticmethod
    def _append(seq: Sequence, token: int, new_tokens: dict[str, list[int]]) -> None:
        seq.append_token(token)
        if token < NUM_AUDIO_TOKENS:
            new_tokens[seq.request_id].append(token)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill admitted sequences together (right-padded) and sample each one's first token."""
        dev, st = self.device, self.state
        embeds = []
        for seq in seqs:
            req = self.requests[seq.request_id]
            seed = self._seed_rng.getrandbits(63) if req.seed is None else int(req.seed) & _SEED_MASK
            st.admit(seq.slot, cfg_weight=req.cfg_weight, temperature=req.temperature, top_p=req.top_p,
                     min_p=req.min_p, repetition_penalty=req.repetition_penalty, seed=seed)
            e = build_prompt_embeds(self.t3, req.text_tokens, req.cond, req.exaggeration, dev, self.dtype,
                                    cond_emb=self._cond_embeds(req.cond, req.exaggeration))
            if e.size(1) != seq.prompt_len:
                raise RuntimeError(f"prompt length {e.size(1)} != expected {seq.prompt_len}; T3 conditioning "
                                   "layout differs from upstream's (speaker + 32 perceiver + emotion)")
            embeds.append(e)  # [2, T_i, C]
        k = len(seqs)
        T_max = max(e.size(1) for e in embeds)
        T_pad = self._prefill_len(T_max)
        slots = self._to_device([s.slot for s in seqs])  # [k]
        rows = self._to_device([r for s in seqs for r in (2 * s.slot, 2 * s.slot + 1)])  # [2k]
        last = self._to_device([s.prompt_len - 1 for s in seqs for _ in (0, 1)])  # [2k]
        if k == 1 and self.prefill_graphs is not None and self.prefill_graphs.bucket(T_max) == T_pad:
            self.prefill_x[:, :T_max].copy_(embeds[0])
            self.prefill_x[:, T_max:T_pad].zero_()  # padding stays finite: its K/V sit masked in the cache
            self.prefill_rows.copy_(rows)
            self.prefill_last.copy_(last)
            self.prefill_graphs.run(T_pad)
            logits = self.prefill_logits  # [2, V]
        else:
            x = embeds[0].new_zeros(2 * k, T_pad, embeds[0].size(-1))  # [2k, T_pad, C]
            for i, e in enumerate(embeds):
                x[2 * i:2 * i + 2, :e.size(1)] = e
            h = self.backbone.prefill(x, rows, self.cache)  # [2k, T_pad, C]
            h_last = h[torch.arange(2 * k, device=dev), last]  # [2k, C]
            logits = self.t3.speech_head(h_last).float()  # [2k, V]
        tok = sample_tokens(logits, st.seen[slots], st.sampling_at(slots), self.vocab_hash)  # [k]
        st.seen[slots, tok] = True
        st.last_token[slots] = tok
        self.prefill_out[:k] = tok
        for seq in seqs:
            st.start(seq.slot, seq.prompt_len)

    def _cond_embeds(self, cond, exaggeration: float) -> torch.Tensor:
        """The voice's conditioning embeddings [1, Lc, C], cached on its T3Conditioning per exaggeration."""
        key = (self._embeds_key, float(exaggeration))
        emb = cond.embeds.get(key)
        if emb is None:
            if len(cond.embeds) >= _MAX_COND_EMBEDS:
                cond.embeds.clear()
            emb = cond.embeds[key] = cond_embeds(self.t3, cond, exaggeration, self.device, self.dtype)
        return emb

    def _prefill_len(self, length: int) -> int:
        """Prompts are right-padded to their prefill bucket (the graphs' shapes), or not at all past the last."""
        buckets = self.config.prefill_buckets
        return pick_bucket(buckets, length) if buckets and length <= buckets[-1] else length

    def _prefill_forward(self, length: int) -> None:
        """One request's prefill on the static buffers (prefill_x[:, :length], rows, last) -> prefill_logits."""
        h = self.backbone.prefill(self.prefill_x[:, :length], self.prefill_rows, self.cache)  # [2, length, C]
        h_last = h[self._two, self.prefill_last]  # [2, C]
        self.prefill_logits.copy_(self.t3.speech_head(h_last))  # [2, V] float32

    def _to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _decode(self, num_slots: int, kv_len: int) -> None:
        """One decode step for slots [0, num_slots) on static buffers (what the full-step graphs capture)."""
        self._decode_forward(num_slots, kv_len)
        self._decode_sample(num_slots)

    def _decode_forward(self, num_slots: int, kv_len: int) -> None:
        """Backbone and speech head for the slots' last tokens -> self.logits[:2 * num_slots]."""
        st, t3, n = self.state, self.t3, num_slots
        x = t3.speech_emb(st.last_token[:n]) + t3.speech_pos_emb.emb(st.speech_pos[:n])  # [n, C]
        C = x.size(-1)
        x = x[:, None, :].expand(n, 2, C).reshape(2 * n, C)  # [2n, C] rows (cond, uncond) per slot
        pos = st.rope_pos[:n, None].expand(n, 2).reshape(2 * n)  # [2n]
        h = self._backbone_decode(x, pos, kv_len, self.cache)  # [2n, C]
        self.logits[:2 * n].copy_(t3.speech_head(h))  # [2n, V] float32

    def _decode_sample(self, num_slots: int) -> None:
        """Guidance, processing and sampling from self.logits; advances the active slots' state."""
        st, n = self.state, num_slots
        new = sample_tokens(self.logits[:2 * n], st.seen[:n], st.sampling_view(n), self.vocab_hash)  # [n]
        st.seen[:n].scatter_(1, new[:, None], True)
        act = st.active[:n]
        st.last_token[:n].copy_(new)
        st.rope_pos[:n] += act
        st.speech_pos[:n] += act
        st.sampling.counter[:n] += act
        st.out_tokens[:n].copy_(new)
