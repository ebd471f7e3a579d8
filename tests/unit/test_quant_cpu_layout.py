"""bitsandbytes layers on both kinds of x86-64 CPU: quantize, forward, save, load and forward again give the same
outputs for every Linear shape the presets hold, on the generic path and on the AVX512-BF16 packed one."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from bnb_cpu_paths import cpu_4bit_path, has_real_packed_kernel, packed_gemv_reference  # noqa: F401  (fixture)
from quant.apply import apply_quant
from quant.cpu_layout import (can_pack, canonicalize, is_packed, pack_codes_canonical, prepare_cpu_layout,
                              to_canonical, unpack_codes)
from quant.prequant import load_quantized, save_quantized
from quant.spec import QuantSpec

bnb = pytest.importorskip("bitsandbytes")

SPECS = {"nf4": QuantSpec("nf4", "bf16"), "fp4-nodq": QuantSpec("fp4", "fp32", double_quant=False),
         "int8": QuantSpec("int8", "bf16", int8_threshold=0.0)}


class One(nn.Module):
    """One Linear of a given shape, as apply_quant wants it: the child of a module."""

    def __init__(self, out_f: int, in_f: int, bias: bool):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):  # x: [..., in] -> [..., out]
        return self.lin(x)


@pytest.fixture(scope="module")
def preset_shapes() -> list[tuple[int, int, bool]]:
    """(out, in, has_bias) of every Linear the pass quantizes in the tiny and full presets (built on meta)."""
    from quant.estimator import model_inventory

    return sorted({(o, i, b) for p in ("tiny", "full") for c in model_inventory(p).components.values()
                   for _, o, i, b in c.linears})


def _quantized(shape, spec, seed=0) -> One:
    torch.manual_seed(seed)
    m = One(*shape).eval()
    apply_quant(m, spec, device="cpu")
    return m


def _run(m: One, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return m(x)


def _file_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_can_pack():
    assert can_pack(1024, 4096, 64) and can_pack(256, 320, 64)
    assert not can_pack(80, 512, 64)        # S3Gen mel projection: rows not a multiple of 32
    assert not can_pack(8194, 1024, 64)     # T3 speech head
    assert not can_pack(1024, 1, 64)        # T3 conditioning projection of one scalar
    assert not can_pack(64, 96, 64)         # in_features not a whole number of blocks


def test_single_input_linear_stays_float():
    m = One(1024, 1, False)
    assert apply_quant(m, SPECS["int8"], device="cpu") == [] and type(m.lin) is nn.Linear


@pytest.mark.parametrize("double_quant", [True, False])
def test_unpack_inverts_the_repack(double_quant):
    """Plain torch, any CPU: bitsandbytes' repack then to_canonical gives back quantize_4bit's exact tensors."""
    m = _quantized((96, 256, False), QuantSpec("nf4", "bf16", double_quant=double_quant))
    lin = m.lin
    lin.support_avx512bf16_for_cpu = True
    assert prepare_cpu_layout(lin)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    qs = lin.weight.quant_state
    lin.weight.data, _ = bnb.functional._convert_weight_packed_for_cpu(lin.weight.data, qs)
    assert is_packed(lin) and qs.absmax.dtype == torch.bfloat16 and not qs.nested
    assert torch.equal(pack_codes_canonical(unpack_codes(lin.weight.data, 96, 256)).reshape(-1, 1),
                       want["lin.weight"])
    assert to_canonical(lin) and not is_packed(lin) and not to_canonical(lin)
    got = m.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.skipif("not has_real_packed_kernel()", reason="this CPU has no AVX512-BF16 kernel to compare against")
def test_reference_kernel_matches_the_real_one():
    m = _quantized((256, 512, True), QuantSpec("nf4", "bf16"))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = _run(m, x)
    assert is_packed(m.lin)
    qs = m.lin.weight.quant_state
    ref = packed_gemv_reference(x, m.lin.weight.data, state=qs) + m.lin.bias
    assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", list(SPECS))
def test_every_preset_shape_round_trips(cpu_4bit_path, method, preset_shapes, tmp_path):
    spec = SPECS[method]
    gen = torch.Generator().manual_seed(3)
    for shape in preset_shapes:
        out_f, in_f, bias = shape
        m = _quantized(shape, spec)
        untouched = copy.deepcopy(m)
        x = torch.randn(2, 5, in_f, generator=gen).to(spec.torch_dtype)     # a batch of rows
        x1 = torch.randn(1, in_f, generator=gen).to(spec.torch_dtype)       # one decode row
        want, want1 = _run(m, x), _run(m, x1)
        if method != "int8":
            packs = cpu_4bit_path == "packed" and can_pack(out_f, in_f, 64)
            assert is_packed(m.lin) == packs, shape
        save_quantized(m, tmp_path / "ran.safetensors")
        assert torch.equal(_run(m, x), want), f"{shape}: saving changed the module"
        save_quantized(untouched, tmp_path / "fresh.safetensors")
        ran, fresh = _file_tensors(tmp_path / "ran.safetensors"), _file_tensors(tmp_path / "fresh.safetensors")
        assert ran.keys() == fresh.keys() and all(torch.equal(ran[k], fresh[k]) for k in ran), \
            f"{shape}: the file depends on whether the model ran"
        loaded = One(*shape).eval()
        load_quantized(loaded, tmp_path / "ran.safetensors", "cpu")
        assert torch.equal(_run(loaded, x), want) and torch.equal(_run(loaded, x1), want1), shape


def test_state_dict_of_a_packed_layer_is_repaired(cpu_4bit_path):
    """bitsandbytes' own state_dict() re-quantizes a packed layer's statistics; to_canonical restores them."""
    m = _quantized((512, 256, False), SPECS["nf4"])
    want = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = _run(m, x)
    m.state_dict()                      # lossy when packed
    canonicalize(m)
    got = m.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(_run(m, x), y)


def test_apply_quant_says_which_kernel(cpu_4bit_path, caplog):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 256), nn.Linear(64, 80)   # 80 rows cannot be packed

    with caplog.at_level(logging.INFO, logger="quant.apply"):
        apply_quant(Two(), SPECS["nf4"], device="cpu", name="two")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("two:"))
    if cpu_4bit_path == "packed":
        assert "1 AVX512-BF16 packed, 1 generic" in line, line
    else:
        assert "2 generic (no AVX512-BF16 on this CPU)" in line, line
