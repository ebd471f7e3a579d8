"""Batched S3Gen flow: speech tokens (+ voice prompt) -> mel frames, for requests of different lengths.

Same math as upstream `CausalMaskedDiffWithXvec.inference` + `CausalConditionalCFM.forward/solve_euler`
(euler steps on a cosine t schedule, classifier-free guidance inside), with:
- rows right-padded to a common bucketed length and masked (the encoder and the estimator mask keys and their
  convs are causal, so a row's valid frames do not see the padding);
- per-request noise from a `NoiseBank` (so batch == alone), read at absolute frame positions (a stream step's
  window reads the frames a one-shot decode of the whole stream would);
- an optional context mel after the prompt's (a stream step's already generated frames, `streaming.py`);
- the estimator run in fp32/bf16/fp16 with the euler state `x` kept in fp32 and every input cast once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import chatterbox.models.s3gen.decoder as upstream_decoder
from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask as upstream_chunk_mask
from chatterbox.models.s3gen.utils.mask import make_pad_mask

from .config import MEL_FRAMES_PER_TOKEN, PRE_LOOKAHEAD_TOKENS
from .graphs import ShapeGraphs
from .noise import NoiseBank
from .transfer import to_device

log = logging.getLogger(__name__)


@dataclass
class FlowRow:
    """One request as the flow sees it (tensors on the engine device)."""

    tokens: torch.Tensor          # [T] int64 speech tokens
    prompt_token: torch.Tensor    # [P] int64
    prompt_feat: torch.Tensor     # [F, 80] float32 (F is 2P, or 2P+1 for odd-length references)
    embedding: torch.Tensor       # [192] float32 x-vector
    seed: int
    finalize: bool = True
    context_mel: torch.Tensor | None = None   # [80, N] float32: condition frames after prompt_feat (stream context)
    noise_offset: int = 0         # frames past the prompt tokens' 2P read the seed's noise this much further on

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_token.shape[0] + self.tokens.shape[0])

    @property
    def num_valid_frames(self) -> int:
        held = 0 if self.finalize else PRE_LOOKAHEAD_TOKENS
        return max(MEL_FRAMES_PER_TOKEN * (self.num_tokens - held), 0)

    @property
    def num_cond_frames(self) -> int:
        """Frames given as the CFM's condition: the prompt's mel, then the context's."""
        return int(self.prompt_feat.shape[0]) + (0 if self.context_mel is None else int(self.context_mel.shape[1]))

    @property
    def num_out_frames(self) -> int:
        """Mel frames after the condition part is cut off (upstream: h.shape[1] - prompt_feat.shape[1])."""
        return max(self.num_valid_frames - self.num_cond_frames, 0)


def add_optional_chunk_mask(xs, masks, use_dynamic_chunk, use_dynamic_left_chunk, decoding_chunk_size,
                            static_chunk_size, num_decoding_left_chunks, enable_full_context=True):
    """upstream `add_optional_chunk_mask` without its host sync in the full-context case (the one inference
    uses): rows whose keys are all masked become all-True there too, computed on the device. Same values;
    makes the estimator CUDA-graph capturable and saves 14 syncs per estimator call."""
    if use_dynamic_chunk or static_chunk_size > 0:
        return upstream_chunk_mask(xs, masks, use_dynamic_chunk, use_dynamic_left_chunk, decoding_chunk_size,
                                   static_chunk_size, num_decoding_left_chunks, enable_full_context)
    return masks | (masks.sum(dim=-1, keepdim=True) == 0)                               # [B, 1, L] bool


def use_sync_free_masks() -> None:
    """Point upstream's ConditionalDecoder at the sync-free mask (process-wide; identical results)."""
    upstream_decoder.add_optional_chunk_mask = add_optional_chunk_mask


def encoder_forward(enc: torch.nn.Module, xs: torch.Tensor, xs_lens: torch.Tensor) -> torch.Tensor:
    """upstream UpsampleConformerEncoder.forward (decoding_chunk_size=0), plus one mask: the embedded pad
    positions are zeroed before the look-ahead conv, which is what a lone row's F.pad(0) shows it.
    xs: [B, L, 512], xs_lens: [B] -> [B, 2L, 512]"""
    T = xs.size(1)
    masks = ~make_pad_mask(xs_lens, T).unsqueeze(1)                                        # [B, 1, L]
    if enc.global_cmvn is not None:
        xs = enc.global_cmvn(xs)
    xs, pos_emb, masks = enc.embed(xs, masks)
    xs = xs * masks.transpose(1, 2).to(xs.dtype)
    chunk_masks = add_optional_chunk_mask(xs, masks, enc.use_dynamic_chunk, enc.use_dynamic_left_chunk,
                                          0, enc.static_chunk_size, -1)
    xs = enc.pre_lookahead_layer(xs)
    xs = enc.forward_layers(xs, chunk_masks, pos_emb, masks)
    xs = xs.transpose(1, 2).contiguous()
    xs, xs_lens = enc.up_layer(xs, xs_lens)                                                # causal upsample x2
    xs = xs.transpose(1, 2).contiguous()
    T = xs.size(1)
    masks = ~make_pad_mask(xs_lens, T).unsqueeze(1)                                        # [B, 1, 2L]
    xs, pos_emb, masks = enc.up_embed(xs, masks)
    chunk_masks = add_optional_chunk_mask(xs, masks, enc.use_dynamic_chunk, enc.use_dynamic_left_chunk,
                                          0, enc.static_chunk_size * enc.up_layer.stride, -1)
    xs = enc.forward_up_layers(xs, chunk_masks, pos_emb, masks)
    if enc.normalize_before:
        xs = enc.after_norm(xs)
    return xs


def cosine_t_span(n_steps: int, device: torch.device) -> torch.Tensor:
    # -> [n_steps + 1] float32, 0 .. 1 (upstream: 1 - cos(linspace * pi / 2))
    t = torch.linspace(0, 1, n_steps + 1, device=device, dtype=torch.float32)
    return 1 - torch.cos(t * 0.5 * torch.pi)


class FlowRunner:
    """Runs `s3gen.flow` (encoder, projection, CFM estimator) batched. Holds no per-request state.

    `core` is the whole device computation (no host sync), so `graphs` can capture it per shape."""

    def __init__(self, flow: torch.nn.Module, noise: NoiseBank, estimator_dtype: torch.dtype,
                 encoder_dtype: torch.dtype = torch.float32, cfg_rate: float | None = None,
                 estimator_fn: torch.nn.Module | None = None):
        self.flow = flow
        self.graphs: ShapeGraphs | None = None   # CUDA graphs of `core`, set by the engine (None: eager)
        self.noise = noise
        self.estimator = flow.decoder.estimator               # the upstream module (weights, dtype)
        self.estimator_fn = self.estimator if estimator_fn is None else estimator_fn   # what runs: it, a FastEstimator, or a compiled one
        self.estimator_dtype = estimator_dtype
        self.encoder_dtype = encoder_dtype
        self.cfg_rate = float(flow.decoder.inference_cfg_rate if cfg_rate is None else cfg_rate)
        if getattr(flow.decoder.estimator, "meanflow", False):
            raise ValueError("meanflow (distilled) S3Gen checkpoints are not supported by this engine; "
                             "use the standard chatterbox S3Gen")

    def prepare(self, rows: list[FlowRow], padded_tokens: int) -> dict[str, torch.Tensor]:
        """Device inputs of `core` for these rows, `padded_tokens` (L) long each."""
        # -> token [B, L] int64, token_len [B] int64, valid [B] int64, cond [B, 2L, 80] float32,
        #    embedding [B, 192] float32, z [B, 80, 2L] float32
        device = rows[0].tokens.device
        B, L = len(rows), padded_tokens
        Tm = MEL_FRAMES_PER_TOKEN * L
        token = torch.zeros(B, L, dtype=torch.long, device=device)
        cond = torch.zeros(B, Tm, 80, device=device)
        for i, r in enumerate(rows):
            P = r.prompt_token.shape[0]
            token[i, :P] = r.prompt_token
            token[i, P:P + r.tokens.shape[0]] = r.tokens
            F0 = r.prompt_feat.shape[0]
            cond[i, :F0] = r.prompt_feat.float()
            if r.context_mel is not None:
                cond[i, F0:F0 + r.context_mel.shape[1]] = r.context_mel.t().float()
        lens = to_device([[r.num_tokens, r.num_valid_frames] for r in rows], device, torch.long)          # [B, 2]
        return dict(token=token, token_len=lens[:, 0], valid=lens[:, 1], cond=cond,
                    embedding=torch.stack([r.embedding.float() for r in rows]),
                    z=self.initial_noise(rows, Tm))

    def encode(self, token, token_len, valid, cond, embedding):
        # token: [B, L] int64, token_len, valid: [B] int64, cond: [B, Tm, 80], embedding: [B, 192]
        # -> mu [B, 80, Tm] float32, mask [B, 1, Tm] float32, cond [B, 80, Tm] float32, spks [B, 80] float32
        flow = self.flow
        L = token.shape[1]
        pos = torch.arange(L, device=token.device)
        tok_mask = (pos[None, :] < token_len[:, None]).unsqueeze(-1)                    # [B, L, 1]
        x = flow.input_embedding(token) * tok_mask                                         # [B, L, 512]
        x = x.to(self.encoder_dtype)
        h = encoder_forward(flow.encoder, x, token_len)                                    # [B, 2L, 512]
        mu = flow.encoder_proj(h.to(flow.encoder_proj.weight.dtype)).float()             # [B, Tm, 80]
        Tm = mu.shape[1]
        mask = (torch.arange(Tm, device=token.device)[None, :] < valid[:, None]).float()  # [B, Tm]
        emb = F.normalize(embedding.float(), dim=1)                                        # [B, 192]
        spks = flow.spk_embed_affine_layer(emb.to(flow.spk_embed_affine_layer.weight.dtype)).float()  # [B, 80]
        return mu.transpose(1, 2).contiguous(), mask[:, None, :], cond.transpose(1, 2).contiguous(), spks

    def initial_noise(self, rows: list[FlowRow], num_frames: int) -> torch.Tensor:
        # -> z [B, 80, num_frames] float32 (row i: seed i's fixed noise, same slice alone or batched; frames past
        #    the prompt tokens' 2P shifted by the row's noise_offset)
        zs = []
        for r in rows:
            if r.noise_offset == 0:
                zs.append(self.noise.get(r.seed, num_frames))
                continue
            P2 = min(MEL_FRAMES_PER_TOKEN * int(r.prompt_token.shape[0]), num_frames)
            start = P2 + r.noise_offset
            zs.append(torch.cat([self.noise.get(r.seed, P2),
                                 self.noise.window(r.seed, start, start + num_frames - P2)], dim=1))
        return torch.stack(zs)

    def solve_inputs(self, z, mu, mask, spks, cond) -> tuple[torch.Tensor, ...]:
        # z, mu, cond: [B, 80, T]; mask: [B, 1, T]; spks: [B, 80]
        # -> x [B, 80, T] float32 (a copy of z: the Euler steps update it in place), and the estimator's
        #    CFG inputs: rows [:B] conditional, rows [B:] unconditional (mu, spks, cond zeroed), as upstream:
        #    mask_in [2B, 1, T], mu_in [2B, 80, T], spks_in [2B, 80], cond_in [2B, 80, T] in the estimator dtype
        dt_ = self.estimator_dtype
        mask_in = torch.cat([mask, mask]).to(dt_)
        mu_in = torch.cat([mu, torch.zeros_like(mu)]).to(dt_)
        spks_in = torch.cat([spks, torch.zeros_like(spks)]).to(dt_)
        cond_in = torch.cat([cond, torch.zeros_like(cond)]).to(dt_)
        return z.to(torch.float32, copy=True), mask_in, mu_in, spks_in, cond_in

    def euler_step(self, x, mask_in, mu_in, spks_in, cond_in, t, r) -> None:
        # one Euler step from time t to r, in place on x [B, 80, T] float32; t, r: [] float32 device tensors
        B = x.shape[0]
        dt_ = self.estimator_dtype
        x_in = torch.cat([x, x]).to(dt_)                                                   # [2B, 80, T]
        t_in = t.expand(2 * B).to(dt_)                                                     # [2B]
        dxdt = self.estimator_fn(x_in, mask_in, mu_in, t_in, spks_in, cond_in).float()
        d_cond, d_uncond = dxdt[:B], dxdt[B:]
        x.add_((r - t) * ((1.0 + self.cfg_rate) * d_cond - self.cfg_rate * d_uncond))

    def prologue(self, token, token_len, valid, cond, embedding, z) -> tuple[torch.Tensor, ...]:
        # `prepare`'s tensors -> `solve_inputs`' (x, mask_in, mu_in, spks_in, cond_in): all but the Euler steps
        mu, mask, cond_t, spks = self.encode(token, token_len, valid, cond, embedding)
        return self.solve_inputs(z, mu, mask, spks, cond_t)

    def core(self, token, token_len, valid, cond, embedding, z, n_steps: int) -> torch.Tensor:
        # `prepare`'s tensors -> x [B, 80, Tm] float32 (prompt frames included); device work only
        x, *cfg_inputs = self.prologue(token, token_len, valid, cond, embedding, z)
        t_span = cosine_t_span(n_steps, z.device)
        for k in range(n_steps):
            self.euler_step(x, *cfg_inputs, t_span[k], t_span[k + 1])
        return x

    @torch.inference_mode()
    def __call__(self, rows: list[FlowRow], padded_tokens: int, n_steps: int) -> list[torch.Tensor]:
        # -> per row mel [80, num_out_frames] float32 (prompt and context frames cut off, as upstream)
        inputs = self.prepare(rows, padded_tokens)
        x = self.core(**inputs, n_steps=n_steps) if self.graphs is None else self.graphs(inputs, n_steps=n_steps)
        return [x[i, :, r.num_cond_frames:r.num_valid_frames] for i, r in enumerate(rows)]
