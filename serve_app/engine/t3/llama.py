"""The T3 Llama backbone in plain torch (gpt-fast style) over a static, slot-addressed KV cache.

Weights are not copied: the forward calls the upstream `LlamaModel`'s own projection modules, so a
quantization pass that swapped them for bitsandbytes layers (quant.apply) is picked up unchanged.
Math follows HF Llama exactly: RMSNorm in fp32, llama3-scaled RoPE (rotate-half), SDPA with scale D^-0.5,
SiLU-gated MLP, final norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Decode attention (one query per row over a masked static cache): the memory-efficient kernel takes the
# additive mask and is capturable; math is the fallback (and what CPUs run). Pinned so the kernel choice,
# and with it graph-vs-eager equality, does not depend on heuristics.
DECODE_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
DECODE_ATTENTION_KERNELS = ("masked", "padded_keys")   # how a decode step attends (T3EngineConfig.decode_attention)


def padded_keys_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlen_k: torch.Tensor,
                          seqstart_q: torch.Tensor, seqstart_k: torch.Tensor, max_len: int) -> torch.Tensor:
    """Decode attention that reads only each row's own keys (CUDA only): row r attends over cache positions
    [0, seqlen_k[r]). The memory-efficient (cutlass) kernel's variable-length mode with per-sequence key lengths,
    xformers' "padded keys" layout: with a mask, SDPA reads every position of the batch's longest row for every row.

    q: [R, H, 1, D]; k_cache, v_cache: [rows, H, S, D] (rows >= R); seqlen_k: [R] int32; seqstart_q: [R + 1] int32
    = 0..R; seqstart_k: [R + 1] int32 = r * H * S -> [R, 1, H * D]
    """
    R, H, _, D = q.shape
    rows, _, S, _ = k_cache.shape
    # The cache seen as one packed [1, M, H, D] key sequence with a key stride of D: "position" m = r*H*S + j of
    # head h sits at m*D + h*S*D = r*H*S*D + h*S*D + j*D, exactly row r, head h, position j of the cache; row r's
    # keys start at seqstart_k[r] = r*H*S. M is the largest extent that stays inside the cache's storage. (Offsets
    # within one layer's cache fit 32 bits: 2^31 elements a layer would be 257 GB of bf16 KV over T3's 30 layers.)
    M = (rows - 1) * H * S + S
    stride = (M * D, D, S * D, 1)
    k = k_cache.as_strided((1, M, H, D), stride, k_cache.storage_offset())
    v = v_cache.as_strided((1, M, H, D), stride, v_cache.storage_offset())
    qv = q.transpose(1, 2).reshape(1, R, H, D)  # [1, R, H, D]: one query per row, rows packed
    out = torch.ops.aten._efficient_attention_forward(
        qv, k, v, None, seqstart_q, seqstart_k, 1, max_len, 0.0, 0, False, seqlen_k=seqlen_k)[0]  # [1, R, H, D]
    return out.view(R, 1, H * D)


def decode_mask(pos: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Masked decode attention's additive mask: pos [R] -> [R, 1, 1, kv_len], key j visible to row r iff j <= pos[r].
    Built once per step (a bool mask would be converted by SDPA in every layer)."""
    visible = torch.arange(kv_len, device=pos.device)[None, :] <= pos[:, None]  # [R, L]
    mask = torch.zeros(pos.shape[0], 1, 1, kv_len, dtype=dtype, device=pos.device)
    return mask.masked_fill_(~visible[:, None, None, :], float("-inf"))


def padded_keys_lengths(pos: torch.Tensor, row_span: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`padded_keys_attention`'s per-step index tensors for rows 0..R-1 at positions pos [R], a cache row holding
    `row_span` = H * S key strides: (seqlen_k [R] = pos + 1, seqstart_q [R + 1] = 0..R, seqstart_k [R + 1] =
    r * row_span), int32, no host sync."""
    starts = torch.arange(pos.shape[0] + 1, dtype=torch.int32, device=pos.device)
    return (pos + 1).to(torch.int32), starts, starts * row_span


# What a compiled decode step calls instead (T3EngineConfig.compile): the kernel runs as it is, outside Inductor,
# and its cache views stay views. Eager steps call padded_keys_attention itself.
_padded_keys_attention_uncompiled = torch.compiler.disable(padded_keys_attention)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., C] -> [..., C]. Normalizes and scales in fp32, rounds once. In fp32 this is HF LlamaRMSNorm
    # bit for bit; in bf16/fp16 HF rounds before the weight multiply (a rounding apart, one fused kernel here).
    return F.rms_norm(x, (x.size(-1),), weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x: [R, T, N, D] (N heads), cos/sin_signed: [R or 1, T, 1, D] in x's dtype -> [R, T, N, D]
    # HF's x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1), written as
    # cat(x2, x1) * cat(-sin1, sin2): the same products (negation is exact), fewer kernels.
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # cat(x2, x1)
    return x * cos + swapped * sin_signed


def _is_plain_linear(*mods: nn.Module) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in mods)


def _fuse_rows(*mods: nn.Linear) -> torch.Tensor:
    """Concatenate Linear weights along the output dim and make each module's weight a view of the result, so
    one GEMM serves all of them and no memory is duplicated. -> [sum(out), in]"""
    fused = torch.cat([m.weight.detach() for m in mods])
    start = 0
    for m in mods:
        n = m.out_features
        m.weight = nn.Parameter(fused[start:start + n], requires_grad=False)
        start += n
    return fused


def rope_tables(tfmr_config, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin_signed: [max_seq_len, D] fp32 (sin_signed has its first half negated, see apply_rope), from a freshly built HF rotary module (fp32 inv_freq, llama3 scaling)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(tfmr_config)  # built on CPU in fp32, untouched by any dtype cast of the model
    inv_freq = rotary.inv_freq.float()  # [D/2]
    pos = torch.arange(max_seq_len, dtype=torch.float32)  # [S]
    freqs = pos[:, None] * inv_freq[None, :]  # [S, D/2], the same fp32 products HF forms
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
    half = sin.size(-1) // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


class KVCache(nn.Module):
    """Per layer K and V of [num_rows, H, max_seq_len, D]; row 2s is slot s's cond row, 2s+1 its uncond row."""

    def __init__(self, num_layers: int, num_rows: int, num_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (num_layers, num_rows, num_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class LlamaBackbone(nn.Module):
    """Prefill (rows of whole prompts, written into chosen cache rows) and decode (one token for rows [0, R))."""

    def __init__(self, tfmr: nn.Module, max_seq_len: int, decode_attention: str = "masked"):
        super().__init__()
        if decode_attention not in DECODE_ATTENTION_KERNELS:
            raise ValueError(f"decode_attention={decode_attention!r}: use one of {DECODE_ATTENTION_KERNELS}")
        self.decode_attention = decode_attention
        cfg = tfmr.config
        self.layers = tfmr.layers
        self.norm = tfmr.norm
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if self.num_kv_heads != self.num_heads:
            raise ValueError("grouped-query attention is not supported: T3's Llama uses num_key_value_heads == num_attention_heads")
        self.max_seq_len = max_seq_len
        cos, sin = rope_tables(cfg, max_seq_len)
        device = self.norm.weight.device  # tables live with the weights; the backbone itself is never moved
        cos, sin = cos.to(device), sin.to(device)
        self.register_buffer("cos", cos, persistent=False)  # [S, D] fp32
        self.register_buffer("sin", sin, persistent=False)  # [S, D] fp32, first half negated
        # Fused q|k|v and gate|up weights where the projections are plain nn.Linear (not quantized). The
        # upstream modules keep working: their weights become views of the fused tensors.
        self._qkv_weight: list[torch.Tensor | None] = []
        self._gate_up_weight: list[torch.Tensor | None] = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            self._qkv_weight.append(_fuse_rows(a.q_proj, a.k_proj, a.v_proj)
                                    if _is_plain_linear(a.q_proj, a.k_proj, a.v_proj) else None)
            self._gate_up_weight.append(_fuse_rows(m.gate_proj, m.up_proj)
                                        if _is_plain_linear(m.gate_proj, m.up_proj) else None)

    def _qkv(self, i: int, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # x: [R, T, C], cos/sin: [R or 1, T, 1, D] -> q, k, v: [R, H, T, D] (q, k rotated; views)
        R, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        w = self._qkv_weight[i] if self._qkv_weight else None
        if w is not None:
            qkv = F.linear(x, w).view(R, T, 3 * H, D)  # one GEMM
            qk = apply_rope(qkv[:, :, :2 * H], cos, sin)  # [R, T, 2H, D], q and k together
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, 2 * H:]
        else:  # quantized (bnb) projections: one call each
            q = apply_rope(attn.q_proj(x).view(R, T, H, D), cos, sin)
            k = apply_rope(attn.k_proj(x).view(R, T, H, D), cos, sin)
            v = attn.v_proj(x).view(R, T, H, D)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _mlp(self, i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # x: [R, T, C] -> [R, T, C]
        mlp = layer.mlp
        w = self._gate_up_weight[i] if self._gate_up_weight else None
        if w is not None:
            gate, up = F.linear(x, w).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        return mlp.down_proj(F.silu(gate) * up)

    def prefill(self, x: torch.Tensor, rows: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # x: [R, T, C] prompt embeddings (right-padded), rows: [R] int64 cache rows -> hidden [R, T, C] after final norm
        # Positions are 0..T-1 for every row; padding sits after each row's prompt, so causal attention keeps real
        # positions exact, and padded K/V beyond a row's length are masked by decode and later overwritten.
        R, T, _ = x.shape
        cos = self.cos[:T].to(x.dtype)[None, :, None]  # [1, T, 1, D]
        sin = self.sin[:T].to(x.dtype)[None, :, None]
        h = x
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            a_in = rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q, k, v = self._qkv(i, attn, a_in, cos, sin)  # [R, H, T, D]
            cache.k[i, rows, :, :T] = k
            cache.v[i, rows, :, :T] = v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [R, H, T, D]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(R, T, -1))
            m_in = rms_norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            h = h + self._mlp(i, layer, m_in)
        return rms_norm(h, self.norm.weight, self.norm.variance_epsilon)

    def decode(self, x: torch.Tensor, pos: torch.Tensor, kv_len: int, cache: KVCache) -> torch.Tensor:
        # x: [R, C] one token per cache row 0..R-1, pos: [R] int64 its RoPE position -> hidden [R, C] after final norm
        # Attends over cache positions [0, kv_len) with key j visible iff j <= pos[r]. No host sync. "masked": SDPA
        # with an additive mask reads all kv_len positions of every row; "padded_keys" (CUDA) reads pos[r] + 1.
        R, C = x.shape
        cos = self.cos[pos].to(x.dtype)[:, None, None]  # [R, 1, 1, D]
        sin = self.sin[pos].to(x.dtype)[:, None, None]
        if self.decode_attention == "padded_keys":
            seqlen_k, starts, key_starts = padded_keys_lengths(pos, self.num_heads * cache.k.size(3))

            fn = _padded_keys_attention_uncompiled if torch.compiler.is_compiling() else padded_keys_attention

            def attend(q, k_cache, v_cache):  # [R, H, 1, D] -> [R, 1, H * D]
                return fn(q, k_cache, v_cache, seqlen_k, starts, key_starts, kv_len)

            h = self._decode_layers(x[:, None, :], pos, cache, cos, sin, attend)
            return rms_norm(h[:, 0], self.norm.weight, self.norm.variance_epsilon)

        mask = decode_mask(pos, kv_len, x.dtype)  # [R, 1, 1, L]

        def attend(q, k_cache, v_cache):  # [R, H, 1, D] over the first kv_len positions -> [R, 1, H * D]
            o = F.scaled_dot_product_attention(q, k_cache[:R, :, :kv_len], v_cache[:R, :, :kv_len], attn_mask=mask)
            return o.transpose(1, 2).reshape(R, 1, -1)  # o: [R, H, 1, D]

        with sdpa_kernel(DECODE_SDPA_BACKENDS):
            h = self._decode_layers(x[:, None, :], pos, cache, cos, sin, attend)
        return rms_norm(h[:, 0], self.norm.weight, self.norm.variance_epsilon)

    def _decode_layers(self, h, pos, cache, cos, sin, attend):
        # h: [R, 1, C], pos: [R], cos/sin: [R, 1, 1, D], attend(q [R, H, 1, D], k_cache, v_cache) -> [R, 1, H * D]
        # -> h: [R, 1, C]
        R = h.size(0)
        row_idx = torch.arange(R, device=h.device)  # [R]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            a_in = rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q, k, v = self._qkv(i, attn, a_in, cos, sin)  # [R, H, 1, D]
            k_cache, v_cache = cache.k[i], cache.v[i]  # [rows, H, S, D]
            k_cache[row_idx, :, pos] = k[:, :, 0]  # write [R, H, D] at each row's own position
            v_cache[row_idx, :, pos] = v[:, :, 0]
            h = h + attn.o_proj(attend(q, k_cache, v_cache))
            m_in = rms_norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            h = h + self._mlp(i, layer, m_in)
        return h
