"""Pre-quantized checkpoints: save after apply_quant, load into bnb layers without re-quantizing (CPU, tiny)."""
from __future__ import annotations

import copy

import pytest
import torch

from bnb_cpu_paths import cpu_4bit_path  # noqa: F401  (fixture: both CPU paths of 4-bit layers)
from quant.apply import apply_quant
from quant.prequant import (load_quantized, read_layers, save_quantized, skip_init, time_load_paths)
from quant.spec import QuantSpec

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_t3():
    from serve_app.model.presets import build_t3, get_preset

    torch.manual_seed(0)
    return build_t3(get_preset("tiny")).eval()


def _build():
    from serve_app.model.presets import build_t3, get_preset

    return build_t3(get_preset("tiny")).eval()


def _fwd(t3, x):  # x: [B, T, 1024] -> [B, T, 1024]
    with torch.inference_mode():
        return t3.tfmr(inputs_embeds=x.to(t3.tfmr.norm.weight.dtype)).last_hidden_state.float()


@pytest.mark.parametrize("spec", [QuantSpec("int8", "bf16", int8_threshold=0.0), QuantSpec("nf4", "bf16"),
                                  QuantSpec("fp4", "fp32", double_quant=False)])
def test_roundtrip_exact(tiny_t3, spec, tmp_path, monkeypatch, cpu_4bit_path):
    x = torch.randn(1, 9, 1024, generator=torch.Generator().manual_seed(3))
    t3 = copy.deepcopy(tiny_t3)
    apply_quant(t3.tfmr, spec)
    want = _fwd(t3, x)
    path = tmp_path / "t3.safetensors"
    layers = save_quantized(t3, path)          # the whole T3: quantized backbone + float extras
    assert len(layers) == 14 and read_layers(path) == layers
    with skip_init():
        fresh = _build()
    for fn in ("quantize_4bit", "int8_vectorwise_quant"):
        monkeypatch.setattr(bnb.functional, fn, lambda *a, **k: pytest.fail("re-quantized while loading"))
    names = load_quantized(fresh, path, "cpu")
    monkeypatch.undo()
    assert sorted(names) == sorted(layers)
    got = _fwd(fresh.eval(), x)
    assert torch.equal(got, want)
    assert torch.equal(fresh.speech_head.weight, t3.speech_head.weight)


def test_errors(tiny_t3, tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a pre-quantized checkpoint"):
        load_quantized(_build(), plain)
    t3 = copy.deepcopy(tiny_t3)
    apply_quant(t3.tfmr, QuantSpec("dynamic_int8", "fp32"))
    with pytest.raises(ValueError, match="quantize at load"):
        save_quantized(t3, tmp_path / "dyn.safetensors")
    t3 = copy.deepcopy(tiny_t3)
    apply_quant(t3.tfmr, QuantSpec("nf4", "bf16"))
    save_quantized(t3, tmp_path / "q.safetensors")
    with torch.device("meta"):
        meta = _build()
    with pytest.raises(ValueError, match="build the module on the CPU"):
        load_quantized(meta, tmp_path / "q.safetensors")


def test_time_load_paths(tiny_t3, tmp_path):
    from safetensors.torch import save_file

    spec = QuantSpec("nf4", "bf16")
    float_path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_t3.state_dict().items()}, str(float_path))
    t3 = copy.deepcopy(tiny_t3)
    apply_quant(t3, QuantSpec("nf4", "bf16", skip=("speech_head", "text_head", "cond_enc", "*emb*")))
    save_quantized(t3, tmp_path / "q.safetensors")
    timing = time_load_paths(_build, float_path, tmp_path / "q.safetensors",
                             QuantSpec("nf4", "bf16", skip=("speech_head", "text_head", "cond_enc", "*emb*")))
    assert timing.num_layers == 14 and timing.quantize_at_load_s > 0 and timing.prequantized_s > 0
