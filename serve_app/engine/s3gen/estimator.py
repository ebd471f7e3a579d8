"""FastEstimator: upstream's CFM estimator (`ConditionalDecoder`, causal, one channel level), same weights, same
math on valid frames, about half the kernels and no layout shuffles.

In a CUDA graph the 10-step euler loop is bound by its kernels' own run time (the first streamed chunk is
1 request = 2 CFG rows of a few hundred frames: ~1,100 kernels a call upstream-style, ~3 us each). This forward
runs the same parameters with less glue:
- channels-last throughout ([B, T, C]): the transformer blocks want it, and upstream transposes around every
  block group and every LayerNorm; the causal k=3 convs become one matmul over 3 shifted frames (conv weight
  [Cout, Cin, 3] read as [Cout, 3 Cin]) instead of cuDNN's NCHW<->NHWC transforms around each conv;
- one attention key bias per call instead of one mask + bias per block (the single-level U-Net keeps one
  length, so upstream's 14 identical masks are one);
- q, k, v as one matmul and the 14 resnet time projections as one (weights concatenated once; plain
  `nn.Linear` only: quantized layers are called as they are);
- `F.scaled_dot_product_attention` called directly: no diffusers mask repeat per head per block, no
  `/ rescale_output_factor` (1.0), no dropout (0.0) kernels;
- no mask multiplications inside the network, only on its output. Rows are right-padded and every op along
  time is causal (the convs read only earlier frames) or masks its keys (attention), so a valid frame never
  sees a padded one: upstream's ~75 interior `x * mask` per call change only padded frames, which are zeroed
  at the end.
Estimators it cannot reproduce exactly (meanflow, several channel levels, chunked masks, other attention
settings) are refused by `supports`, and the engine keeps the upstream forward for them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.models.s3gen.decoder import mask_to_bias


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


def _plain_linear(m: nn.Module) -> bool:
    # nn.Linear or diffusers' LoRACompatibleLinear without a LoRA layer; not a quantized subclass (bnb, dynamic)
    return (type(m) is nn.Linear or type(m).__name__ == "LoRACompatibleLinear") and \
        getattr(m, "lora_layer", None) is None


def _concat_linear(mods: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One [sum(out), in] weight (and bias) for Linears that share an input; None if any is not plain."""
    if not all(_plain_linear(m) for m in mods):
        return None
    w = torch.cat([m.weight.detach() for m in mods])
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        return None
    return w, (torch.cat([m.bias.detach() for m in mods]) if all(has_bias) else None)


class _Conv:
    """A causal (left-padded) or 1x1 Conv1d, applied channels-last as one matmul.
    weight [Cout, Cin, k] -> [Cout, Cin k] with index c k + j, matching unfold's [.., Cin, k] windows."""

    def __init__(self, conv: nn.Conv1d):
        assert conv.stride == (1,) and conv.dilation == (1,) and conv.groups == 1, conv
        self.k = conv.kernel_size[0]
        self.left = getattr(conv, "causal_padding", (conv.padding[0], 0))[0]
        assert (self.k == 1 and self.left == 0) or (self.left == self.k - 1 and conv.padding == (0,)), conv
        self.weight = conv.weight.detach().reshape(conv.out_channels, -1)                   # [Cout, Cin k]
        self.bias = None if conv.bias is None else conv.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, Cin] -> [B, T, Cout]
        if self.k > 1:
            B, T, C = x.shape
            x = F.pad(x, (0, 0, self.left, 0)).unfold(1, self.k, 1).reshape(B, T, C * self.k)  # [B, T, Cin k]
        return F.linear(x, self.weight, self.bias)


class FastEstimator(nn.Module):
    """Callable like the estimator: (x, mask, mu, t, spks, cond) -> dx/dt. Build it after the estimator's final
    dtype, device and quantization are set (the fused weights are copies). `mask` must be a prefix per row (valid
    frames first, padding after), as the engine builds it; frames past it come out zero, as upstream."""

    def __init__(self, est: nn.Module):
        super().__init__()
        if not supports(est):
            raise ValueError("this S3Gen estimator is not the standard chatterbox one; use its own forward")
        self.est = est
        self.qkv: list[torch.Tensor | None] = []        # per transformer block: [3 H D, C] or None (quantized)
        for blk in self._blocks():
            a = blk.attn1
            fused = _concat_linear([a.to_q, a.to_k, a.to_v])
            self.qkv.append(None if fused is None or fused[1] is not None else fused[0])
        self.resnets = [b[0] for group in (est.down_blocks, est.mid_blocks, est.up_blocks) for b in group]
        self.time_proj = _concat_linear([r.mlp[1] for r in self.resnets])   # 14 x [C, 4 C] as one
        self.convs = {id(m): _Conv(m) for m in est.modules() if isinstance(m, nn.Conv1d)}

    def _blocks(self):
        est = self.est
        for group in (est.down_blocks, est.mid_blocks, est.up_blocks):
            for b in group:
                yield from b[1]

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        return self.convs[id(conv)](x)

    def _causal_block(self, blk, x: torch.Tensor) -> torch.Tensor:
        # upstream CausalBlock1D (conv k=3, LayerNorm over channels, Mish) without its masks; x: [B, T, C]
        conv, _, norm, _, act = blk.block
        return act(norm(self._conv(conv, x)))

    def _resnet(self, r, x: torch.Tensor, t_proj: torch.Tensor) -> torch.Tensor:
        # upstream CausalResnetBlock1D without its masks; x: [B, T, Cin], t_proj: [B, Cout] -> [B, T, Cout]
        h = self._causal_block(r.block1, x) + t_proj[:, None, :]
        h = self._causal_block(r.block2, h)
        return h + self._conv(r.res_conv, x)

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

    def _transformers(self, blocks, first: int, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # h: [B, T, C] -> [B, T, C]; upstream BasicTransformerBlock (layer_norm, self-attention, gelu FF)
        for i, blk in enumerate(blocks):
            h = self._attention(blk, self.qkv[first + i], blk.norm1(h), bias) + h
            ff = blk.ff.net
            h = ff[2](ff[0](blk.norm3(h))) + h                                           # GELU(proj), Linear
        return h

    def forward(self, x, mask, mu, t, spks=None, cond=None):
        # x, mu, cond: [B, 80, T]; mask: [B, 1, T]; t: [B]; spks: [B, 80] -> [B, 80, T]
        est = self.est
        T = x.shape[-1]
        temb = est.time_mlp(est.time_embeddings(t).to(t.dtype))                            # [B, 4 C]
        if self.time_proj is not None:                                                     # 14 x [B, C]
            t_projs = F.linear(F.mish(temb), *self.time_proj).chunk(len(self.resnets), dim=1)
        else:
            t_projs = [r.mlp(temb) for r in self.resnets]
        parts = [x, mu]
        if spks is not None:
            parts.append(spks[:, :, None].expand(-1, -1, T))
        if cond is not None:
            parts.append(cond)
        h = torch.cat(parts, dim=1).transpose(1, 2)                                        # [B, T, 320]
        m = mask.transpose(1, 2)                                                           # [B, T, 1]
        keys = mask.bool()
        keys = keys | (keys.sum(dim=-1, keepdim=True) == 0)   # upstream: fully masked rows attend everywhere
        bias = mask_to_bias(keys, h.dtype)[:, None]                                        # [B, 1, 1, T]
        n, r = 0, 0
        (resnet, blocks, downsample), = est.down_blocks
        h = self._resnet(resnet, h, t_projs[r])
        h = self._transformers(blocks, n, h, bias)
        n, r = n + len(blocks), r + 1
        skip = h
        h = self._conv(downsample, h)
        for resnet, blocks in est.mid_blocks:
            h = self._resnet(resnet, h, t_projs[r])
            h = self._transformers(blocks, n, h, bias)
            n, r = n + len(blocks), r + 1
        (resnet, blocks, upsample), = est.up_blocks
        h = torch.cat([h, skip], dim=2)                                                    # [B, T, 2 C]
        h = self._resnet(resnet, h, t_projs[r])
        h = self._transformers(blocks, n, h, bias)
        h = self._conv(upsample, h)
        h = self._causal_block(est.final_block, h)
        return (self._conv(est.final_proj, h) * m).transpose(1, 2)                        # [B, 80, T]
