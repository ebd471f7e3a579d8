"""S3GenEngine on CPU: batched == alone, same math as upstream, lengths, batching plan, stripped modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from s3gen_helpers import one_thread, fresh_s3gen, random_tokens, random_voice  # noqa: F401  (one_thread: autouse fixture)
from serve_app.engine.s3gen import (
    S3GenEngine, S3GenEngineConfig, VocodeInput, strip_enrollment_modules,
)
from serve_app.model.strip import is_removed
from serve_app.engine.s3gen.vocoder import HiftRow

STEPS = 3


@pytest.fixture(scope="module")
def engine():
    s3gen = fresh_s3gen("tiny")
    strip_enrollment_modules(s3gen)  # the engine must not need the tokenizer / speaker encoder
    assert is_removed(s3gen.tokenizer) and is_removed(s3gen.speaker_encoder)
    assert sum(p.numel() for p in s3gen.tokenizer.parameters()) == 0
    return S3GenEngine(s3gen, S3GenEngineConfig(n_cfm_timesteps=STEPS, length_bucket=16))


def _inputs():
    return [
        VocodeInput(random_tokens(20, 1), random_voice(8, 1), seed=11),
        VocodeInput(random_tokens(9, 2), random_voice(12, 2, odd_feat=True), seed=12),
        VocodeInput(random_tokens(14, 3), random_voice(5, 3), seed=13),
    ]


def test_batched_equals_alone_and_lengths(engine):
    inputs = _inputs()
    batched = engine.vocode(inputs)
    for inp, wav in zip(inputs, batched):
        alone = engine.vocode([inp])[0]
        P = inp.conds["prompt_token"].shape[1]
        F = inp.conds["prompt_feat"].shape[1]
        # 2 mel frames per token, 480 samples per frame; the prompt part (F frames) is cut off
        assert wav.shape == alone.shape == (480 * (2 * (P + len(inp.speech_tokens)) - F),)
        assert wav.dtype == np.float32 and np.isfinite(wav).all()
        np.testing.assert_allclose(wav, alone, atol=2e-4)
    # the same seed gives the same audio; another seed another one
    again = engine.vocode([inputs[0]])[0]
    other = engine.vocode([VocodeInput(inputs[0].speech_tokens, inputs[0].conds, seed=99)])[0]
    np.testing.assert_allclose(again, batched[0], atol=1e-6)
    assert np.abs(other - batched[0]).max() > 1e-3


def test_stats_count_one_shot_work(engine):
    """One-shot decodes: every token goes through the flow once (stream steps add context: test_s3gen_streaming)."""
    import dataclasses

    before = dataclasses.replace(engine.stats)
    engine.vocode(_inputs())
    s = engine.stats
    assert s.num_tokens_in - before.num_tokens_in == s.num_flow_tokens - before.num_flow_tokens == 20 + 9 + 14
    assert (s.num_flow_rows - before.num_flow_rows, s.num_steps - before.num_steps) == (3, 1)
    assert s.busy_seconds > before.busy_seconds


def test_flow_matches_upstream_with_same_noise(engine, monkeypatch):
    inp = _inputs()[0]
    row = engine._row(inp, True)
    ours = engine.flow([row], row.num_tokens, STEPS)[0]                                # [80, N]
    import chatterbox.models.s3gen.flow_matching as fm

    noise = engine.noise.get(row.seed, 2 * row.num_tokens)
    monkeypatch.setattr(fm.torch, "randn_like", lambda mu, **k: noise[None].clone().to(mu))
    up, _ = engine.s3gen.flow.inference(token=inp.speech_tokens[None], token_len=torch.tensor([20]),
                                        finalize=True, n_timesteps=STEPS, **dict(inp.conds))
    torch.testing.assert_close(ours, up[0], atol=1e-4, rtol=1e-4)


def test_hift_matches_upstream_decode(engine):
    g = torch.Generator().manual_seed(0)
    mels = [torch.randn(80, 30, generator=g) - 4, torch.randn(80, 11, generator=g) - 4]
    wavs, srcs, _ = engine.hift([HiftRow(m, seed=i) for i, m in enumerate(mels)])
    hift = engine.s3gen.mel2wav
    with torch.inference_mode():
        for m, w, s in zip(mels, wavs, srcs):
            up = hift.decode(x=m[None], s=s[None, None])[0]
            assert w.shape == up.shape == (480 * m.shape[1],)
            torch.testing.assert_close(w, up, atol=1e-4, rtol=1e-3)
            # f0 predictor (masked, batched) == upstream on the lone row
            f0_up = hift.f0_predictor(m[None])[0]
            f0 = engine.hift._f0(m[None], torch.ones(1, 1, m.shape[1]))[0]
            torch.testing.assert_close(f0, f0_up, atol=1e-4, rtol=1e-4)


def test_conds_roundtrip_through_voice_conds(engine):
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals
    from serve_app.engine.s3gen import conditionals_to_voice_conds, voice_conds_to_conditionals

    gen = random_voice(10, 4)
    conds = Conditionals(T3Cond(speaker_emb=torch.randn(1, 256), cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150)),
                                emotion_adv=0.7 * torch.ones(1, 1, 1)), gen)
    vc = conditionals_to_voice_conds(conds)
    assert vc.gen_prompt_feat.shape == (1, 20, 80) and vc.t3_emotion_adv == pytest.approx(0.7)
    back = voice_conds_to_conditionals(vc)
    for k in ("prompt_token", "prompt_feat", "embedding"):
        torch.testing.assert_close(back.gen[k], gen[k].to(back.gen[k].dtype))
    tokens = random_tokens(6, 5)
    a = engine.vocode([VocodeInput(tokens, gen, seed=1)])[0]
    b = engine.vocode([VocodeInput(tokens, engine.prepare_conds(vc), seed=1)])[0]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_empty_and_special_tokens(engine):
    assert engine.vocode([VocodeInput([], random_voice(4, 1))])[0].size == 0
    with pytest.raises(ValueError, match="special token"):
        engine.vocode([VocodeInput([6561, 1, 2], random_voice(4, 1))])


@pytest.mark.slow
def test_full_architecture_flow_batched_equals_alone():
    """The real S3Gen architecture (random weights): flow batched == alone (HiFT is full size in tiny too)."""
    s3gen = fresh_s3gen("full")
    strip_enrollment_modules(s3gen)
    eng = S3GenEngine(s3gen, S3GenEngineConfig(n_cfm_timesteps=2, length_bucket=8))
    rows = [eng._row(VocodeInput(random_tokens(n, n), random_voice(p, n), seed=n), True) for n, p in ((10, 6), (4, 9))]
    both = eng.flow(rows, 16, 2)
    for row, mel in zip(rows, both):
        alone = eng.flow([row], row.num_tokens, 2)[0]
        assert mel.shape == alone.shape == (80, 2 * row.tokens.shape[0])
        torch.testing.assert_close(mel, alone, atol=1e-4, rtol=1e-4)


def test_sync_free_chunk_mask_equals_upstream():
    from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask as upstream
    from serve_app.engine.s3gen.flow import add_optional_chunk_mask

    lengths = torch.tensor([5, 8, 1])
    masks = (torch.arange(8)[None, :] < lengths[:, None])[:, None, :]             # [3, 1, 8] bool
    xs = torch.zeros(3, 8, 16)
    ours = add_optional_chunk_mask(xs, masks.clone(), False, False, 0, 0, -1)
    ref = upstream(xs, masks.clone(), False, False, 0, 0, -1)
    assert ours.dtype == torch.bool and torch.equal(ours, ref) and not ours[0, 0, 5:].any()
    # an all-masked row (a padded graph row) becomes all-True, as upstream intends (upstream's own branch
    # for it raises NameError: chatterbox 0.1.7's mask.py uses `logging` without importing it)
    empty = add_optional_chunk_mask(xs[:1], torch.zeros(1, 1, 8, dtype=torch.bool), False, False, 0, 0, -1)
    assert empty.all()
    # static chunks go to upstream unchanged
    assert torch.equal(add_optional_chunk_mask(xs, masks.clone(), False, False, 0, 2, -1),
                       upstream(xs, masks.clone(), False, False, 0, 2, -1))


def test_step_groups_hands_out_steps_results_one_flow_call_at_a_time(engine):
    """`step_groups`: the audio and states `step` gives, one flow call's rows at a time, the call with the earliest
    input first (a caller puts its most urgent rows first), every input once, rows with nothing new in the first."""
    import dataclasses

    from serve_app.engine.s3gen import StreamState

    cfg = dataclasses.replace(engine.config, max_batch_tokens=64, batch_overhead_tokens=0)   # small calls
    eng = S3GenEngine.__new__(S3GenEngine)
    eng.__dict__.update(engine.__dict__, config=cfg)
    eng.stats = type(engine.stats)()
    voice = random_voice(8, 9)
    long_first = [VocodeInput(random_tokens(30, 9), voice, seed=1, finalize=False, stream_state=StreamState())]
    batch = long_first + _inputs() + [VocodeInput(random_tokens(2, 3), voice, seed=2, finalize=False,
                                                  stream_state=StreamState())]   # too short: nothing new yet
    whole = eng.step(batch)
    groups = list(eng.step_groups(batch))
    assert len(groups) == 3 and eng.stats.num_steps == 2          # the budget makes 3 flow calls; counted once
    firsts = [min(i for i, _ in g if i != 4) for g in groups]
    assert firsts == sorted(firsts) and firsts[0] == 0               # the earliest input's call first
    assert 4 in [i for i, _ in groups[0]]                            # nothing new: with the first call
    assert sorted(i for g in groups for i, _ in g) == list(range(len(batch)))
    for g in groups:
        for i, (audio, state) in g:
            np.testing.assert_allclose(audio, whole[i][0], atol=1e-5)
            assert (state is None) == (whole[i][1] is None)
            if state is not None:
                assert state.num_tokens_vocoded == whole[i][1].num_tokens_vocoded
    assert groups[0][1][1][0].size == 0                               # input 4 had nothing new
