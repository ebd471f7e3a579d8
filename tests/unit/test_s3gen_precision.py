"""Half precision on CPU: the engine's bf16 / fp16 estimator stays within a stated distance of fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from s3gen_helpers import one_thread, fresh_s3gen, log_spectral_distance, random_tokens, random_voice  # noqa: F401  (one_thread: autouse fixture)
from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig, VocodeInput

# Stated tolerances vs the fp32 engine on the same weights and noise (tiny preset, 3 steps):
# mel max |diff| / mel std < 0.1 (bf16, measured 0.043) or 0.05 (fp16, measured 0.006); audio LSD < 0.5 dB
# (measured 0.10 dB bf16, 0.02 dB fp16). The estimator runs in half, and the flow encoder too in bf16; x and
# HiFT stay fp32.
MEL_REL_TOL = {"bf16": 0.1, "fp16": 0.05}
MAX_LSD_DB = 0.5


def _mels_and_audio(dtype: str):
    eng = S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(dtype=dtype, n_cfm_timesteps=3))
    inp = VocodeInput(random_tokens(16, 1), random_voice(6, 1), seed=2)
    row = eng._row(inp, True)
    mel = eng.flow([row], row.num_tokens, 3)[0]
    return eng, mel, eng.vocode([inp])[0]


@pytest.fixture(scope="module")
def fp32():
    return _mels_and_audio("fp32")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_close_to_fp32(fp32, dtype):
    _, mel32, wav32 = fp32
    try:
        eng, mel, wav = _mels_and_audio(dtype)
    except (RuntimeError, NotImplementedError) as e:  # an op without a CPU half kernel in this torch build
        pytest.skip(f"{dtype} on CPU: {e}")
    assert eng.flow.estimator.final_proj.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # the flow encoder follows a bf16 estimator (measured on an H100: same LSD vs fp32); fp16 keeps it fp32
    assert next(eng.flow.flow.encoder.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float32}[dtype]
    assert mel.dtype == torch.float32 and wav.dtype == np.float32 and wav.shape == wav32.shape
    rel = float((mel - mel32).abs().max() / mel32.std())
    assert rel < MEL_REL_TOL[dtype], rel
    assert log_spectral_distance(wav, wav32) < MAX_LSD_DB


def test_quantized_flow_through_quant_pass(fp32):
    """The engine hands the flow (encoder + estimator) to quant.apply_quant; dynamic_int8 runs on CPU."""
    from quant.spec import QuantSpec

    _, _, wav32 = fp32
    eng = S3GenEngine(fresh_s3gen("tiny"), S3GenEngineConfig(
        n_cfm_timesteps=3, quant=QuantSpec(method="dynamic_int8", dtype="fp32")))
    assert len(eng.quantized) > 0
    wav = eng.vocode([VocodeInput(random_tokens(16, 1), random_voice(6, 1), seed=2)])[0]
    assert wav.shape == wav32.shape and log_spectral_distance(wav, wav32) < 1.0   # measured ~0.3 dB
