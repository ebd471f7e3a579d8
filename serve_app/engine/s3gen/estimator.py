"""FastEstimator: upstream's CFM estimator (`ConditionalDecoder`, causal, one channel level) with half the
kernels a call, same weights, same math.

In a CUDA graph the 10-step euler loop is bound by its kernel count (~2,000 small kernels a step upstream; the
first streamed chunk is 1 request = 2 CFG rows of a few hundred frames, far from compute bound). This forward
runs the same modules with less glue:
- one attention key bias per call instead of one mask + bias per block (the single-level U-Net keeps one
  length, so upstream's 14 identical masks are one);
- q, k, v as one matmul (weights concatenated once; only for plain `nn.Linear`, quantized layers are called
  as they are);
- `F.scaled_dot_product_attention` called directly: no diffusers mask repeat per head per block, no
  `/ rescale_output_factor` (1.0), no dropout (0.0) kernels.
Everything else (resnet blocks, convs, norms, feed-forwards, time embedding) is the upstream module itself.
Estimators it cannot reproduce exactly (meanflow, several channel levels, chunked masks, other attention
settings) are refused by `supports`, and the engine keeps the upstream forward for them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.models.s3gen.decoder import mask_to_bias


def _fusable(linears: list[nn.Module]) -> bool:
    return all(type(m).__name__ in ("Linear", "LoRACompatibleLinear") and isinstance(m, nn.Linear)
               and m.bias is None and getattr(m, "lora_layer", None) is None for m in linears)


def _block_supported(blk: nn.Module) -> bool:
    a = blk.attn1
    return (not blk.use_ada_layer_norm and not blk.use_ada_layer_norm_zero and blk.attn2 is None
            and not blk.only_cross_attention and blk._chunk_size is None
            and a.rescale_output_factor == 1.0 and not a.residual_connection and a.group_norm is None
            and a.spatial_norm is None and a.norm_q is None and a.norm_k is None
            and type(a.processor).__name__ == "AttnProcessor2_0"
            and abs(a.scale - (a.inner_dim // a.heads) ** -0.5) < 1e-9
            and all(not isinstance(m, nn.Dropout) or m.p == 0.0 for m in blk.modules()))


def supports(est: nn.Module) -> bool:
    """True when FastEstimator computes exactly what `est.forward` does."""
    blocks = [b for group in (est.down_blocks, est.mid_blocks, est.up_blocks) for b in group]
    return (not getattr(est, "meanflow", False) and getattr(est, "causal", False)
            and getattr(est, "static_chunk_size", 0) == 0
            and len(est.down_blocks) == 1 and len(est.up_blocks) == 1
            and all(_block_supported(t) for b in blocks for t in b[1]))


class FastEstimator(nn.Module):
    """Callable like the estimator: (x, mask, mu, t, spks, cond) -> dx/dt. Build it after the estimator's final
    dtype, device and quantization are set (the fused q/k/v weights are copies)."""

    def __init__(self, est: nn.Module):
        super().__init__()
        if not supports(est):
            raise ValueError("this S3Gen estimator is not the standard chatterbox one; use its own forward")
        self.est = est
        self.qkv: list[torch.Tensor | None] = []        # per transformer block: [3 H D, C] or None (quantized)
        for blk in self._blocks():
            a = blk.attn1
            lin = [a.to_q, a.to_k, a.to_v]
            self.qkv.append(torch.cat([m.weight.detach() for m in lin]) if _fusable(lin) else None)

    def _blocks(self):
        est = self.est
        for group in (est.down_blocks, est.mid_blocks, est.up_blocks):
            for b in group:
                yield from b[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.est.final_proj.weight.dtype

    def _attention(self, blk, w_qkv, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # h: [B, T, C] (after norm1), bias: [B, 1, 1, T] -> [B, T, C]
        a = blk.attn1
        B, T, _ = h.shape
        H = a.heads
        if w_qkv is not None:
            q, k, v = F.linear(h, w_qkv).view(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, T, D]
        else:
            q, k, v = (m(h).view(B, T, H, -1).transpose(1, 2) for m in (a.to_q, a.to_k, a.to_v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                    # [B, H, T, D]
        return a.to_out[0](o.transpose(1, 2).reshape(B, T, -1))

    def _transformers(self, blocks, first: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T] -> [B, C, T]; upstream BasicTransformerBlock (layer_norm, self-attention, gelu FF)
        h = x.transpose(1, 2).contiguous()                                               # [B, T, C]
        for i, blk in enumerate(blocks):
            h = self._attention(blk, self.qkv[first + i], blk.norm1(h), bias) + h
            ff = blk.ff.net
            h = ff[2](ff[0](blk.norm3(h))) + h                                           # GELU(proj), Linear
        return h.transpose(1, 2).contiguous()

    def forward(self, x, mask, mu, t, spks=None, cond=None):
        # x, mu, cond: [B, 80, T]; mask: [B, 1, T]; t: [B]; spks: [B, 80] -> [B, 80, T]
        est = self.est
        T = x.shape[-1]
        temb = est.time_mlp(est.time_embeddings(t).to(t.dtype))                            # [B, 4 C]
        parts = [x, mu]
        if spks is not None:
            parts.append(spks[:, :, None].expand(-1, -1, T))
        if cond is not None:
            parts.append(cond)
        h = torch.cat(parts, dim=1)                                                        # [B, 320, T]
        keys = mask.bool()
        keys = keys | (keys.sum(dim=-1, keepdim=True) == 0)   # upstream: fully masked rows attend everywhere
        bias = mask_to_bias(keys, h.dtype)[:, None]                                        # [B, 1, 1, T]
        n = 0
        (resnet, blocks, downsample), = est.down_blocks
        h = resnet(h, mask, temb)
        h = self._transformers(blocks, n, h, bias)
        n += len(blocks)
        skip = h
        h = downsample(h * mask)
        for resnet, blocks in est.mid_blocks:
            h = resnet(h, mask, temb)
            h = self._transformers(blocks, n, h, bias)
            n += len(blocks)
        (resnet, blocks, upsample), = est.up_blocks
        h = torch.cat([h[:, :, :skip.shape[-1]], skip], dim=1)
        h = resnet(h, mask, temb)
        h = self._transformers(blocks, n, h, bias)
        h = upsample(h * mask)
        h = est.final_block(h, mask)
        return est.final_proj(h * mask) * mask
