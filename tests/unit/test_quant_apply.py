"""apply_quant on the tiny preset with the real bitsandbytes CPU kernels: what is replaced, what it computes."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from bnb_cpu_paths import cpu_4bit_path  # noqa: F401  (fixture: both CPU paths of 4-bit layers)
from quant.apply import apply_quant, find_linears, is_skipped
from quant.components import quantize_model
from quant.spec import QuantSpec
from quant.strategies import resolve_strategy

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_t3():
    from serve_app.model.presets import build_t3, get_preset

    torch.manual_seed(0)
    return build_t3(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def tiny_s3gen():
    from serve_app.model.presets import build_s3gen, get_preset

    torch.manual_seed(0)
    return build_s3gen(get_preset("tiny")).eval()


def _backbone_out(t3, x):  # x: [B, T, 1024] -> [B, T, V_speech] fp32
    with torch.inference_mode():
        h = t3.tfmr(inputs_embeds=x.to(t3.tfmr.norm.weight.dtype)).last_hidden_state
        return t3.speech_head(h.to(t3.speech_head.weight.dtype)).float()


# relative L2 error of the speech logits vs fp32 on the tiny random model, measured ~0.006 (int8),
# 0.048 (nf4), 0.064 (fp4), 0.019 (dynamic int8); budgets with ~2-3x margin
@pytest.mark.parametrize("spec,cls,budget", [
    (QuantSpec("int8", "fp32", int8_threshold=0.0), "Linear8bitLt", 0.02),
    (QuantSpec("int8", "bf16", int8_threshold=6.0), "Linear8bitLt", 0.03),
    (QuantSpec("nf4", "bf16"), "Linear4bit", 0.12),
    (QuantSpec("fp4", "fp32", double_quant=False), "Linear4bit", 0.15),
    (QuantSpec("dynamic_int8", "fp32"), "DynamicQuantizedLinear", 0.05),
])
def test_t3_backbone_methods(tiny_t3, spec, cls, budget, caplog, cpu_4bit_path):
    x = torch.randn(2, 12, 1024, generator=torch.Generator().manual_seed(1))
    ref = _backbone_out(tiny_t3, x)
    t3 = copy.deepcopy(tiny_t3)
    with caplog.at_level(logging.INFO, logger="quant.apply"):
        names = apply_quant(t3.tfmr, spec, name="t3")
    assert len(names) == 2 * 7 and all(n.startswith("layers.") for n in names)
    assert f"t3: 14 Linear -> {spec.label()}" in caplog.text
    q = t3.tfmr.get_submodule(names[0])
    assert q._get_name() == cls and not q.training  # inherits eval mode
    if spec.method == "int8":
        assert q.weight.dtype == torch.int8 and q.weight.SCB is not None  # really quantized on the CPU
    if spec.method in ("nf4", "fp4"):
        assert q.weight.dtype == torch.uint8 and q.weight.quant_state.quant_type == spec.method
        assert q.weight.quant_state.nested == spec.double_quant and q.compute_dtype == spec.torch_dtype
    assert t3.tfmr.norm.weight.dtype == spec.torch_dtype                    # the rest cast to spec.dtype
    assert t3.tfmr.rotary_emb.inv_freq.dtype == torch.float32               # non-persistent buffers kept
    assert t3.speech_head.weight.dtype == torch.float32                     # outside the module: untouched
    out = _backbone_out(t3, x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < budget, f"{spec.label()}: relative error {rel:.4f} over budget {budget}"
    assert find_linears(t3.tfmr) == []                                       # idempotent: nothing left to swap


def test_none_casts_only(tiny_t3):
    t3 = copy.deepcopy(tiny_t3)
    assert apply_quant(t3.tfmr, QuantSpec("none", "bf16")) == []
    assert t3.tfmr.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert type(t3.tfmr.layers[0].mlp.up_proj) is nn.Linear


def test_skip_patterns(tiny_t3):
    assert is_skipped("layers.0.mlp.up_proj", ("layers.0",)) and not is_skipped("layers.1.mlp", ("layers.0",))
    t3 = copy.deepcopy(tiny_t3)
    names = apply_quant(t3.tfmr, QuantSpec("int8", "fp32", skip=("*.mlp", "layers.1.self_attn.q_proj")))
    assert len(names) == 7 and not any(".mlp." in n for n in names)
    assert type(t3.tfmr.layers[0].mlp.down_proj) is nn.Linear


def test_lora_compatible_linear_subclass_is_replaced(tiny_s3gen):
    """diffusers' LoRACompatibleLinear in the CFM estimator subclasses nn.Linear: match by isinstance."""
    from diffusers.models.lora import LoRACompatibleLinear

    flow = copy.deepcopy(tiny_s3gen.flow)
    lora = [n for n, m in flow.decoder.named_modules() if isinstance(m, LoRACompatibleLinear)]
    assert lora, "expected LoRACompatibleLinear modules in the tiny CFM estimator"
    names = apply_quant(flow.decoder, QuantSpec("int8", "fp32", int8_threshold=0.0))
    assert set(lora) <= set(names)
    assert all(isinstance(flow.decoder.get_submodule(n), bnb.nn.Linear8bitLt) for n in lora)


def test_quantize_model_per_component(tiny_t3, tiny_s3gen, caplog):
    t3, s3 = copy.deepcopy(tiny_t3), copy.deepcopy(tiny_s3gen)
    specs = resolve_strategy("mixed", device="cpu")
    with caplog.at_level(logging.INFO, logger="quant.apply"):
        done = quantize_model(specs, t3=t3, s3gen=s3)
    assert len(done["t3"]) == 14 and done["t3_extra"] == []
    assert done["s3gen_flow_decoder"] and done["s3gen_flow_encoder"]
    assert not any(n.startswith("decoder") for n in done["s3gen_flow_encoder"])  # flow encoder skips the decoder
    assert "voice_encoder" not in done  # no model given
    for key in ("t3:", "s3gen_flow_encoder:", "s3gen_flow_decoder:", "hift:"):
        assert key in caplog.text
    assert isinstance(t3.tfmr.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(t3.speech_head) is nn.Linear


def test_errors():
    with pytest.raises(ValueError, match="pass the parent module"):
        apply_quant(nn.Linear(4, 4), QuantSpec("int8"))
    with pytest.raises(ValueError, match="CPU only"):
        apply_quant(nn.Sequential(nn.Linear(4, 4)), QuantSpec("dynamic_int8", "fp32"), device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="run on a GPU"):
            apply_quant(nn.Sequential(nn.Linear(4, 4)), QuantSpec("nf4"), device="cuda")
