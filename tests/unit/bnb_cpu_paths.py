"""Both CPU paths of bitsandbytes' 4-bit layers, on any x86-64 machine (quant/cpu_layout.py says why they differ).

`cpu_4bit_path` runs a test once per path by forcing the switch where bitsandbytes reads it when it builds a
Linear4bit (`bitsandbytes.nn.modules.has_avx512bf16`):
  generic  the canonical layout and the generic kernel (what a CPU without AVX512-BF16 runs);
  packed   the repack on first forward and the AVX512-BF16 kernel. On a CPU without that instruction set the
           kernel cannot run, so `packed_gemv_reference` (plain torch, same layout, bf16 math) stands in for it;
           test_quant_cpu_layout checks the stand-in against the real kernel wherever the CPU has one.
"""
from __future__ import annotations

import pytest
import torch

PATHS = ("generic", "packed")


def has_real_packed_kernel() -> bool:
    import bitsandbytes as bnb

    return bool(bnb.functional.has_avx512bf16())


def packed_gemv_reference(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    # A: [..., K] float, B: [N, K/2] uint8 in the packed CPU layout -> [..., N] in A.dtype (bf16 math, as the kernel)
    from quant.cpu_layout import unpack_codes

    n, k = state.shape
    codes = unpack_codes(B.view(torch.uint8), n, k).long()                          # [N, K]
    scale = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)         # absmax [K/bs, N] -> [N, K]
    w = (state.code.float()[codes] * scale).to(torch.bfloat16)                       # [N, K]
    y = (A.to(torch.bfloat16) @ w.T).to(A.dtype)
    if out is not None:
        return out.copy_(y)
    return y


@pytest.fixture(params=PATHS)
def cpu_4bit_path(request, monkeypatch) -> str:
    """'generic' or 'packed': Linear4bit layers built inside the test take that CPU path."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import modules

    packed = request.param == "packed"
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: packed)
    if packed and not has_real_packed_kernel():
        monkeypatch.setattr(bnb.functional, "gemv_4bit", packed_gemv_reference)
    return request.param
