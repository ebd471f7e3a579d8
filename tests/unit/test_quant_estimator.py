"""The memory estimator against the reference numbers measured on an H100 (tolerance 10 %).

Uses the full architecture, built on the meta device (parameter counts only, no memory)."""
from __future__ import annotations

import pytest

from quant.components import S3GEN_KEYS
from quant.estimator import GiB, MiB, estimate_replica, model_inventory, upstream_specs
from quant.spec import QuantSpec
from quant.strategies import named_strategy

TOL = 0.10


def close(got_bytes: float, want_mib: float) -> bool:
    return abs(got_bytes / MiB - want_mib) <= TOL * want_mib


def test_full_inventory_counts():
    inv = model_inventory("full")
    t3 = inv.components["t3"]
    assert len(t3.linears) == 210 and inv.num_layers == 30 and inv.hidden_size == 1024
    assert 500e6 < t3.num_params < 510e6
    assert inv.components["voice_encoder"].num_linear_params < 0.1 * inv.components["voice_encoder"].num_params
    assert inv.components["campplus"].linears == ()


@pytest.mark.parametrize("method,want", [("none", 960), ("int8", 482), ("nf4", 248)])
def test_t3_backbone_weights(method, want):
    est = estimate_replica({"t3": QuantSpec(method, "bf16")}, num_requests=0)
    assert close(est.weights["t3"], want), est.weights["t3"] / MiB


def test_fp32_t3_and_s3gen():
    t3 = estimate_replica({"t3": QuantSpec("none", "fp32"), "t3_extra": QuantSpec("none", "fp32")})
    assert close(t3.weights_bytes, 2031)
    s3 = estimate_replica({k: QuantSpec("none", "fp32") for k in S3GEN_KEYS})
    assert close(s3.weights_bytes, 1024)


def test_upstream_single_request_peak():
    est = estimate_replica(upstream_specs(), num_requests=1)  # default request shape: ~10 s of speech
    assert close(est.allocated_bytes, 3476), est.allocated_bytes / MiB
    assert est.cuda_context_bytes == int(0.75 * GiB)
    assert est.total_bytes == est.allocated_bytes + est.cuda_context_bytes


def test_kv_cache_and_scaling():
    spec = {"t3": QuantSpec("int8", "bf16")}
    one = estimate_replica(spec, num_requests=1, seq_len=1000)
    # 30 layers x (k, v) x 2 rows (guidance) x 1000 x 16 heads x 64 dims x 2 bytes
    assert one.kv_cache_bytes == 30 * 2 * 2 * 1000 * 1024 * 2
    eight = estimate_replica(spec, num_requests=8, seq_len=1000)
    assert eight.kv_cache_bytes == 8 * one.kv_cache_bytes
    assert eight.activation_bytes > one.activation_bytes and eight.weights == one.weights
    assert estimate_replica(spec, ray_replica=False).cuda_context_bytes == int(0.6 * GiB)
    totals = [estimate_replica(named_strategy(n, "cuda")).weights_bytes for n in ("none", "conservative", "mixed")]
    assert totals[0] > totals[1] > totals[2]
    with pytest.raises(ValueError, match="unknown component"):
        estimate_replica({"llm": QuantSpec()})
