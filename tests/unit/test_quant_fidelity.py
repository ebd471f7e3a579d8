"""Fidelity of each strategy against the fp32 reference on the tiny preset (random weights, CPU, real bnb kernels).

Error budgets: measured on random tiny weights (seed 0), then set with ~2.5-3x margin. They catch a broken pass
(wrong layer, wrong dtype, lost quant state), not perceptual quality, which needs trained weights and the hooks.

    measured (32 positions; 20 tokens, 4 CFM steps)
    strategy      T3 logits rel err / KL / top-1     flow mel rel L2 / LSD
    conservative  0.006 / 7e-6  / 0.97                0.020 / 0.24 dB
    mixed         0.044 / 3e-4  / 0.84                0.020 / 0.24 dB
    aggressive    0.044 / 3e-4  / 0.84                0.165 / 2.0 dB
    dynamic       0.017 / 5e-5  / 0.97                0.032 / 0.39 dB
The 4-bit numbers agree to these digits on both CPU paths (generic, and AVX512-BF16 packed: bnb_cpu_paths.py).
"""
from __future__ import annotations

import pytest
import torch

from bnb_cpu_paths import cpu_4bit_path  # noqa: F401  (fixture: both CPU paths of 4-bit layers)
from quant.fidelity import (FidelityHooks, evaluate_specs, logit_metrics, mel_metrics, run_hooks,
                            waveform_metrics, word_error_rate)
from quant.strategies import resolve_strategy

pytest.importorskip("bitsandbytes")

# strategy: (t3 rel_err, t3 kl, t3 min top1, flow rel_l2, flow lsd_db)
BUDGETS = {
    "none": (1e-6, 1e-6, 1.0, 1e-6, 1e-4),
    "conservative": (0.02, 1e-3, 0.90, 0.05, 0.6),
    "mixed": (0.10, 2e-3, 0.70, 0.05, 0.6),
    "aggressive": (0.10, 2e-3, 0.70, 0.40, 5.0),
    "dynamic": (0.05, 1e-3, 0.85, 0.08, 1.0),
}


@pytest.fixture(scope="module")
def tiny_models():
    from serve_app.model.presets import build_s3gen, build_t3, get_preset

    torch.manual_seed(0)
    return build_t3(get_preset("tiny")).eval(), build_s3gen(get_preset("tiny")).eval()


@pytest.mark.parametrize("strategy", list(BUDGETS))
def test_strategy_within_budget(tiny_models, strategy, cpu_4bit_path):
    t3, s3gen = tiny_models
    res = evaluate_specs(resolve_strategy(strategy, device="cpu"), t3=t3, s3gen=s3gen, seed=0, seq_len=32,
                         num_tokens=20, n_timesteps=4)
    rel, kl, top1, mel_rel, lsd = BUDGETS[strategy]
    t, f = res["t3"], res["s3gen_flow"]
    msg = f"{strategy}: {res}"
    assert t["rel_err"] <= rel and t["kl"] <= kl and t["top1"] >= top1, msg
    assert f["rel_l2"] <= mel_rel and f["lsd_db"] <= lsd, msg


def test_metrics_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 50, generator=g)
    same = logit_metrics(a, a.clone())
    assert same.rel_err == 0 and abs(same.kl) < 1e-6 and same.top1 == same.topk == 1.0
    shifted = logit_metrics(a, a + 1.0)            # softmax is shift invariant
    assert shifted.kl < 1e-5 and shifted.top1 == 1.0 and shifted.rel_err > 0
    mel = torch.randn(1, 80, 20, generator=g)
    m = mel_metrics(mel, mel + 0.1)                # +0.1 neper everywhere = 0.869 dB
    assert abs(m.lsd_db - 0.8686) < 1e-3
    wav = torch.randn(24000, generator=g)
    assert waveform_metrics(wav, wav)["stft_lsd_db"] == 0.0
    assert waveform_metrics(wav, 0.5 * wav)["rel_l2"] == pytest.approx(0.5)


def test_hooks():
    assert word_error_rate("the cat sat", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "a cat") == pytest.approx(2 / 3)
    hooks = FidelityHooks(asr=lambda wav, sr: "hello world", speaker_embed=lambda wav, sr: torch.ones(4))
    out = run_hooks(hooks, "hello there world", torch.zeros(10), torch.zeros(10), 24000)
    assert out == {"wer_ref": pytest.approx(1 / 3), "wer_quant": pytest.approx(1 / 3), "speaker_similarity": 1.0}
    assert run_hooks(FidelityHooks(), "x", torch.zeros(1), torch.zeros(1), 1) == {}
