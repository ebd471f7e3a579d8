"""QuantSpec validation, strategy resolution and the CHATTERBOX_QUANTIZATION parser (pure Python, no models)."""
from __future__ import annotations

import pytest

from quant.spec import QuantSpec, parse_spec
from quant.strategies import (COMPONENT_KEYS, parse_bytes, parse_quantization, resolve_quantization,
                              resolve_strategy)


def test_spec_defaults_and_validation():
    s = QuantSpec()
    assert (s.method, s.dtype, s.int8_threshold, s.double_quant, s.skip) == ("none", "bf16", 6.0, True, ())
    with pytest.raises(ValueError, match="choose one of"):
        QuantSpec("int4")
    with pytest.raises(ValueError, match="dtype"):
        QuantSpec("int8", "fp8")
    with pytest.raises(ValueError, match="set dtype='fp32'"):
        QuantSpec("dynamic_int8", "bf16")
    assert QuantSpec(skip="lm_head").skip == ("lm_head",)


def test_parse_spec():
    base = QuantSpec("none", "fp16", int8_threshold=0.0)
    assert parse_spec("int8", base) == QuantSpec("int8", "fp16", int8_threshold=0.0)
    assert parse_spec("nf4:bf16", base).dtype == "bf16"
    assert parse_spec("int8@6:fp32", base) == QuantSpec("int8", "fp32", int8_threshold=6.0)
    assert parse_spec("dynamic_int8", base).dtype == "fp32"
    with pytest.raises(ValueError, match="int8@0"):
        parse_spec("int8@x")


@pytest.mark.parametrize("name,t3,flow", [
    ("none", "none", "none"), ("conservative", "int8", "int8"), ("mixed", "nf4", "int8"),
    ("aggressive", "nf4", "nf4"), ("dynamic", "dynamic_int8", "dynamic_int8"),
])
def test_named_strategies_cpu(name, t3, flow):
    specs = resolve_strategy(name, device="cpu")
    assert set(specs) == set(COMPONENT_KEYS)
    assert specs["t3"].method == t3
    assert specs["s3gen_flow_encoder"].method == specs["s3gen_flow_decoder"].method == flow
    for k in ("hift", "campplus", "voice_encoder"):
        assert specs[k].method == "none"
    if t3 == "int8":
        assert specs["t3"].int8_threshold == 0.0  # CUDA-graph capturable


def test_aggressive_goes_everywhere_bnb_applies():
    specs = resolve_strategy("aggressive", device="cpu")
    assert {k for k, s in specs.items() if s.method == "nf4"} == {
        "t3", "t3_extra", "s3gen_flow_encoder", "s3gen_flow_decoder", "s3_tokenizer"}


def test_overrides_and_errors():
    specs = resolve_strategy("mixed", device="cpu", overrides={"t3": QuantSpec("int8", "fp32")})
    assert specs["t3"].method == "int8"
    with pytest.raises(ValueError, match="unknown quantization strategy 'fast'"):
        resolve_strategy("fast", device="cpu")
    with pytest.raises(ValueError, match="LSTM.*voice_encoder=none"):
        resolve_strategy("none", device="cpu", overrides={"voice_encoder": QuantSpec("int8")})
    with pytest.raises(ValueError, match="unknown component 'decoder'"):
        resolve_strategy("none", device="cpu", overrides={"decoder": QuantSpec("int8")})
    with pytest.raises(ValueError, match="CPU only"):
        resolve_strategy("dynamic", device="cuda")


def test_bnb_impossible_device_raises():
    with pytest.raises(ValueError, match="bitsandbytes.*mps"):
        resolve_strategy("mixed", device="mps")


def test_env_parsing():
    name, over, budget = parse_quantization("mixed,t3=int8,flow=none:fp16,vram=20GiB", "cpu")
    assert name == "mixed" and budget == 20 << 30
    assert over["t3"] == QuantSpec("int8", "fp32", int8_threshold=0.0)  # keeps the strategy's dtype
    assert over["s3gen_flow_encoder"].dtype == over["s3gen_flow_decoder"].dtype == "fp16"
    specs = resolve_quantization("conservative,t3=nf4", "cpu")
    assert (specs["t3"].method, specs["s3gen_flow_decoder"].method) == ("nf4", "int8")
    assert resolve_quantization("none", "cpu")["t3"].method == "none"
    assert resolve_strategy("mixed,t3=int8", device="cpu")["t3"].method == "int8"  # full syntax accepted too
    for bad, msg in [("", "empty"), ("mixed,t3", "component=method"), ("mixed,t9=int8", "unknown component"),
                     ("turbo", "unknown quantization strategy"), ("auto,vram=lots", "memory size")]:
        with pytest.raises(ValueError, match=msg):
            resolve_quantization(bad, "cpu")
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1e9") == 10**9


def test_auto_picks_by_budget():
    from quant.estimator import estimate_replica
    from quant.strategies import auto_strategy_name, named_strategy

    # CPU: nothing to budget, no quantization
    assert resolve_strategy("auto", device="cpu")["t3"].method == "none"
    totals = {n: estimate_replica(named_strategy(n, "cuda")).total_bytes
              for n in ("none", "conservative", "mixed", "aggressive")}
    assert totals["none"] > totals["conservative"] > totals["mixed"] > totals["aggressive"]
    # budgets are checked against the estimator, so no GPU is needed to choose
    assert auto_strategy_name("cuda", 40 << 30) == "none"
    assert auto_strategy_name("cuda", totals["conservative"]) == "conservative"
    assert auto_strategy_name("cuda", totals["aggressive"] + 1) == "aggressive"
    # a T3-only replica with 16 requests x 2000 tokens: the KV cache (~3.7 GiB) is counted
    t3_only = {k: v for k, v in named_strategy("conservative", "cuda").items() if k.startswith("t3")}
    need = estimate_replica(t3_only, num_requests=16, seq_len=2000).total_bytes
    assert auto_strategy_name("cuda", need, components=["t3", "t3_extra"], num_requests=16,
                              seq_len=2000) == "conservative"
    with pytest.raises(ValueError, match="no quantization strategy fits.*lower the concurrency"):
        auto_strategy_name("cuda", 1 << 30)
    with pytest.raises(ValueError, match="no quantization strategy fits"):
        resolve_strategy("auto,vram=1GiB", device="cuda")
