"""bitsandbytes' packed CPU layout for 4-bit weights, and how the pass and pre-quantized files live with it.

On a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and later) bitsandbytes 0.50 repacks a `Linear4bit`
in place on its first inference forward (`_convert_weight_packed_for_cpu`): the 4-bit codes are regrouped in
blocks of 32 output rows for its fused kernel, and the absmax statistics become bf16, transposed, with double
quantization undone. One decode row through a 4096x1024 nf4 layer took 0.07 ms there against 0.65 ms on the
generic path (2-core AMD EPYC, bitsandbytes' own kernel without the optional `kernels` package).
Two things break on the way:
  - the repack asserts out_features % 32 == 0 (and reshapes the statistics assuming in_features % blocksize == 0):
    other layers (S3Gen's 80-bin projections, T3's 8194-way speech head) fail on their first forward;
  - `state_dict()` undoes it lossily: double-quantized statistics are re-quantized from their bf16 copy, and
    plain ones are left transposed, so a save/load round trip no longer gives the same module.

What we do, for every Linear4bit the pass builds or loads (`prepare_cpu_layout`):
  - a layer whose shape cannot be packed stays on the generic kernel (`support_avx512bf16_for_cpu = False`);
  - a layer that can keeps bitsandbytes' lazy repack, and its quant state remembers the statistics that
    quantize_4bit produced (per 64 weights, 1 byte with double quant, 4 without: 3 % or 12 % of the codes);
  - `to_canonical` restores exactly the layout quantize_4bit produced (the codes are a permutation; the statistics
    come from that memory). `save_quantized` calls it first, so a pre-quantized file holds the same bytes
    whichever CPU wrote it and whether or not the model ran, and the next forward repacks to the same values.
Call `canonicalize` too before moving a module that ran on such a CPU to a GPU (`Params4bit.to` does not unpack).

bitsandbytes decides the path in one place, `bitsandbytes.nn.modules.has_avx512bf16`, read when a Linear4bit is
built; the tests force it on and off there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BLOCK_N = 32          # output rows per block of bitsandbytes' packed CPU layout
PACKED = "AVX512-BF16 packed"
GENERIC = "generic"
_PACK_MARKS = ("original_dtype", "original_nested", "original_qshape", "original_storage_type")


@dataclass(frozen=True)
class CanonicalStats:
    """A 4-bit layer's statistics as quantize_4bit produced them (what the repack replaces)."""
    absmax: torch.Tensor          # [num_blocks] fp32, or uint8 with double quant
    nested: bool
    offset: Any                   # double quant: the absmax mean; else None
    state2: Any                   # double quant: the QuantState of absmax; else None
    dtype: torch.dtype            # dtype the weight dequantizes to


def packing_available() -> bool:
    """Whether bitsandbytes builds Linear4bit layers for the packed CPU kernel on this machine."""
    try:
        from bitsandbytes.nn import modules
    except Exception:  # no bitsandbytes: nothing is packed
        return False
    return bool(modules.has_avx512bf16())


def cpu_4bit_kernel() -> str:
    """'AVX512-BF16 packed' or 'generic': the kernel 4-bit layers that can be packed use on this CPU."""
    return PACKED if packing_available() else GENERIC


def can_pack(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' repack handles a [out_features, in_features] weight quantized in `blocksize` blocks."""
    return out_features % BLOCK_N == 0 and in_features % 2 == 0 and in_features % blocksize == 0


def is_packed(layer: nn.Module) -> bool:
    qs = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def prepare_cpu_layout(layer: nn.Module) -> bool:
    """Settle a filled (quantized or loaded) Linear4bit's CPU path; True when it will run packed on a CPU."""
    qs = layer.weight.quant_state
    if not can_pack(layer.out_features, layer.in_features, qs.blocksize):
        layer.support_avx512bf16_for_cpu = False
    if not getattr(layer, "support_avx512bf16_for_cpu", False) or layer.weight.device.type != "cpu":
        return False  # on a GPU nothing repacks; moved to the CPU later, to_canonical keeps its bf16 statistics
    qs.chatterbox_canonical = CanonicalStats(qs.absmax, qs.nested, qs.offset, qs.state2, qs.dtype)
    return True


def unpack_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    # packed: [N, K/2] uint8 in the packed CPU layout -> [N, K] uint8 4-bit codes (0..15), row-major
    rows = packed.reshape(-1, BLOCK_N)                       # [N*K/64, 32]: 32 low nibbles, then 32 high
    codes = torch.cat([rows & 0xF, rows >> 4], dim=-1)       # [N*K/64, 64], ordered (row in block, k parity)
    codes = codes.reshape(out_features // BLOCK_N, in_features // 2, BLOCK_N, 2)
    return codes.transpose(1, 2).reshape(out_features, in_features)


def pack_codes_canonical(codes: torch.Tensor) -> torch.Tensor:
    # codes: [N, K] uint8 (0..15) -> [N*K/2] uint8, two codes per byte, the first in the high nibble (quantize_4bit)
    flat = codes.reshape(-1)
    return (flat[0::2] << 4) | flat[1::2]


def to_canonical(layer: nn.Module) -> bool:
    """Put a Linear4bit back in the layout quantize_4bit produced, exactly; True if anything changed.

    Handles a layer that is packed now, and one whose packing `state_dict()` already undid (lossy statistics,
    restored from what prepare_cpu_layout kept)."""
    w = layer.weight
    qs = w.quant_state
    if qs is None or not hasattr(qs, "original_qshape"):
        return False  # never repacked
    if qs.packing_format_for_cpu:
        n, k = qs.shape
        data = pack_codes_canonical(unpack_codes(w.data.view(torch.uint8), n, k)).reshape(qs.original_qshape)
        storage = getattr(qs, "original_storage_type", None)
        w.data = data.view(storage) if storage is not None else data
    saved: CanonicalStats | None = getattr(qs, "chatterbox_canonical", None)
    dev = w.device
    if saved is not None:
        qs.absmax, qs.nested, qs.offset, qs.dtype = saved.absmax.to(dev), saved.nested, saved.offset, saved.dtype
        if saved.nested:
            saved.state2.to(dev)
            qs.offset = saved.offset.to(dev)
        qs.state2 = saved.state2
    elif qs.packing_format_for_cpu or qs.absmax.dim() == 2:
        # built elsewhere (no memory of its statistics): keep the bf16 ones it ran with, untransposed, in fp32.
        # A double-quantized layer that state_dict() already unpacked keeps bitsandbytes' re-quantized statistics.
        qs.absmax = qs.absmax.T.reshape(-1).float().contiguous()
        qs.nested, qs.offset, qs.state2, qs.dtype = False, None, None, getattr(qs, "original_dtype", qs.dtype)
    qs.packing_format_for_cpu = False
    for mark in _PACK_MARKS:
        if hasattr(qs, mark):
            delattr(qs, mark)
    return True


def canonicalize(module: nn.Module) -> int:
    """to_canonical on every Linear4bit in `module`; returns how many changed."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return 0
    return sum(to_canonical(m) for m in module.modules() if isinstance(m, bnb.nn.Linear4bit))


def describe_cpu_layout(module: nn.Module) -> str:
    """Which CPU kernel the Linear4bit layers of `module` use, for logs and reports; '' when it has none."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return ""
    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return ""
    packed = sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers)
    if not packed and not packing_available():
        return f"{len(layers)} {GENERIC} (no AVX512-BF16 on this CPU)"
    return f"{packed} {PACKED}, {len(layers) - packed} {GENERIC} (shape not packable)"
