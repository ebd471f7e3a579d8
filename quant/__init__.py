"""Quantization for Chatterbox serving (issue 3): a pass per component that model code never knows about.

    specs = resolve_strategy("mixed", device="cuda")            # or resolve_quantization("mixed,t3=int8", "cuda")
    apply_quant(t3.tfmr, specs["t3"], name="t3")                 # logs "t3: 210 Linear -> nf4/bf16"
    estimate_replica(specs, num_requests=8, seq_len=1024)        # MemoryEstimate breakdown

Importing this package does not import chatterbox; only the estimator's inventory (and fidelity) build models.
"""
from quant.apply import apply_quant, bnb_unavailable_reason, find_linears
from quant.components import COMPONENT_KEYS, quantize_model
from quant.estimator import MemoryEstimate, estimate_replica
from quant.spec import QuantSpec, parse_spec
from quant.strategies import ENV_VAR, parse_quantization, resolve_quantization, resolve_strategy

__all__ = ["COMPONENT_KEYS", "MemoryEstimate", "estimate_replica", "quantize_model", "QuantSpec", "apply_quant", "bnb_unavailable_reason", "find_linears", "parse_spec", "resolve_strategy",
           "resolve_quantization", "parse_quantization", "ENV_VAR"]
