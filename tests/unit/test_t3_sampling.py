"""Logits processing matches upstream's HF processors; the counter-based sampler is exact and batch-independent."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopPLogitsWarper)

from serve_app.engine.t3.sampling import (SamplingTensors, exponential_noise, make_vocab_hash, process_logits,
                                          sample_tokens)

V = 500


def _params(n, **kw):
    base = dict(cfg_weight=0.5, temperature=0.8, top_p=1.0, min_p=0.05, repetition_penalty=1.2, seed=0, counter=0)
    base.update(kw)
    return SamplingTensors(*(torch.tensor([base[k]] * n, dtype=torch.int64 if k in ("seed", "counter") else torch.float32)
                             for k in ("cfg_weight", "temperature", "top_p", "min_p", "repetition_penalty", "seed",
                                       "counter")))


def _upstream(cond, uncond, ids, cfg, temp, top_p, min_p, pen):
    # the processing in chatterbox T3.inference, one request
    logits = cond + torch.as_tensor(cfg, dtype=cond.dtype) * (cond - uncond)
    logits = RepetitionPenaltyLogitsProcessor(penalty=float(pen))(ids, logits)
    if temp != 1.0:
        logits = logits / temp
    logits = MinPLogitsWarper(min_p=min_p)(ids, logits)
    return TopPLogitsWarper(top_p=top_p)(ids, logits)


@pytest.mark.parametrize("cfg,temp,top_p,min_p,pen", [
    (0.5, 0.8, 1.0, 0.05, 1.2), (0.0, 1.0, 0.9, 0.0, 1.0), (1.5, 0.3, 0.5, 0.1, 2.0), (0.3, 1.3, 0.95, 0.2, 0.8)])
def test_process_logits_matches_hf_processors(cfg, temp, top_p, min_p, pen):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(2, V, generator=g) * 3
    ids = torch.tensor([[V - 1, 3, 17, 3, 250]])
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, ids[0]] = True
    ours = process_logits(rows, seen, _params(1, cfg_weight=cfg, temperature=temp, top_p=top_p, min_p=min_p,
                                              repetition_penalty=pen))
    ref = _upstream(rows[0:1], rows[1:2], ids, cfg, temp, top_p, min_p, pen)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


def test_per_row_parameters_are_independent():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(4, V, generator=g)
    seen = torch.zeros(2, V, dtype=torch.bool)
    p = _params(2)
    p.top_p[1], p.temperature[1], p.cfg_weight[1] = 0.7, 0.5, 1.0
    both = process_logits(rows, seen, p)
    for i in range(2):
        one = process_logits(rows[2 * i:2 * i + 2], seen[i:i + 1],
                             SamplingTensors(*(t[i:i + 1] for t in vars(p).values())))
        assert torch.equal(both[i:i + 1], one)


def test_greedy_rows_take_argmax():
    rows = torch.randn(2, V)
    tok = sample_tokens(rows, torch.zeros(1, V, dtype=torch.bool), _params(1, temperature=0.0, min_p=0.0),
                        make_vocab_hash(V, "cpu"))
    assert tok.item() == torch.argmax(rows[0] + 0.5 * (rows[0] - rows[1])).item()


def test_noise_depends_only_on_seed_and_counter():
    vh = make_vocab_hash(V, "cpu")
    e1 = exponential_noise(torch.tensor([7, 9, 7]), torch.tensor([3, 3, 4]), vh)
    e2 = exponential_noise(torch.tensor([9]), torch.tensor([3]), vh)
    assert torch.equal(e1[1], e2[0])
    assert not torch.equal(e1[0], e1[2]) and not torch.equal(e1[0], e1[1])
    assert (e1 > 0).all() and torch.isfinite(e1).all()
    assert abs(e1.mean().item() - 1.0) < 0.1  # Exp(1)


def test_exponential_race_samples_the_distribution():
    # 4000 draws (distinct counters) from a fixed 4-way distribution: frequencies within a few sigma
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    vh = make_vocab_hash(4, "cpu")
    noise = exponential_noise(torch.full((n,), 1234), torch.arange(n), vh)  # [n, 4]
    draws = torch.argmax(probs[None] / noise, dim=-1)
    freq = torch.bincount(draws, minlength=4).float() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 4 * sigma).all(), freq
