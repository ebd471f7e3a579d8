"""Voice enrollment: same conditionals as upstream prepare_conditionals, LRU cache, conds.pt round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from s3gen_helpers import one_thread, fresh_s3gen, random_tokens  # noqa: F401  (one_thread: autouse fixture)
from serve_app.engine.enrollment import VoiceCache, VoiceEnroller, load_conds, save_conds
from serve_app.engine.s3gen import S3GenEngine, S3GenEngineConfig, VocodeInput, strip_enrollment_modules


def _clip(sr: int, seconds: float = 2.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    wav = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (wav + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def parts():
    from serve_app.model.presets import build_voice_encoder

    torch.manual_seed(0)
    return fresh_s3gen("tiny"), build_voice_encoder().eval()


@pytest.fixture(scope="module")
def enrolled(parts):
    s3gen, ve = parts
    enroller = VoiceEnroller.from_s3gen(ve, s3gen)
    return enroller.enroll(_clip(22_050), 22_050, exaggeration=0.7)


def test_enroll_matches_upstream_prepare_conditionals(parts, enrolled):
    import librosa

    s3gen, ve = parts
    wav = _clip(22_050)
    # upstream ChatterboxTTS.prepare_conditionals, step by step (librosa.load(sr=24000) == librosa.resample)
    ref_24k = librosa.resample(wav, orig_sr=22_050, target_sr=24_000)
    ref_16k = librosa.resample(ref_24k, orig_sr=24_000, target_sr=16_000)
    gen = s3gen.embed_ref(ref_24k[:10 * 24_000], 24_000, device="cpu")
    t3_tokens, _ = s3gen.tokenizer.forward([ref_16k[:6 * 16_000]], max_len=150)
    ve_embed = torch.from_numpy(ve.embeds_from_wavs([ref_16k], sample_rate=16_000)).mean(0, keepdim=True)

    c = enrolled
    for k in ("prompt_token", "prompt_token_len", "prompt_feat", "embedding"):
        torch.testing.assert_close(c.gen[k], gen[k])
    # upstream keeps an odd mel frame (F = 2T + 1) when the clip is not a multiple of 40 ms; the engine cuts F
    assert c.gen["prompt_feat"].shape[1] - 2 * c.gen["prompt_token"].shape[1] in (0, 1)
    torch.testing.assert_close(c.t3.cond_prompt_speech_tokens, torch.atleast_2d(t3_tokens))
    torch.testing.assert_close(c.t3.speaker_emb, ve_embed)
    assert float(c.t3.emotion_adv.reshape(-1)[0]) == pytest.approx(0.7)


def test_conds_pt_roundtrip_is_upstream_compatible(enrolled, tmp_path):
    from chatterbox.tts import Conditionals

    path = save_conds(enrolled, tmp_path / "voice" / "conds.pt")
    for loaded in (load_conds(path), Conditionals.load(path)):  # ours and upstream's loader
        torch.testing.assert_close(loaded.gen["prompt_feat"], enrolled.gen["prompt_feat"])
        torch.testing.assert_close(loaded.t3.speaker_emb, enrolled.t3.speaker_emb)
    enrolled.save(tmp_path / "upstream.pt")                    # upstream's writer, our loader
    torch.testing.assert_close(load_conds(tmp_path / "upstream.pt").gen["embedding"], enrolled.gen["embedding"])


def test_enrolled_voice_vocodes_on_a_stripped_s3gen(enrolled):
    s3gen = fresh_s3gen("tiny")
    assert strip_enrollment_modules(s3gen) == ["tokenizer", "speaker_encoder"]
    assert strip_enrollment_modules(s3gen) == []                          # already stripped
    with pytest.raises(RuntimeError, match="voice stage"):
        s3gen.tokenizer(torch.zeros(1, 16_000))
    with pytest.raises(ValueError, match="stripped"):
        VoiceEnroller.from_s3gen(torch.nn.Module(), s3gen)
    eng = S3GenEngine(s3gen, S3GenEngineConfig(n_cfm_timesteps=2))
    wav = eng.vocode([VocodeInput(random_tokens(5, 1), eng.prepare_conds(enrolled.gen), seed=0)])[0]
    P, F = enrolled.gen["prompt_token"].shape[1], enrolled.gen["prompt_feat"].shape[1]
    assert wav.shape == (480 * (2 * (P + 5) - F),) and np.isfinite(wav).all()   # upstream's length rule


def test_voice_cache_is_a_bounded_lru():
    cache = VoiceCache(max_voices=2)
    assert cache.put("a", 1) == [] and cache.put("b", 2) == []
    assert cache.get("a") == 1                 # a is now the most recent
    assert cache.put("c", 3) == ["b"]
    assert "b" not in cache and len(cache) == 2 and cache.ids() == ["a", "c"]
    assert cache.pop("a") == 1 and cache.get("a") is None and cache.num_evicted == 1
    with pytest.raises(ValueError):
        VoiceCache(0)


def test_too_short_clip_is_rejected(parts):
    s3gen, ve = parts
    with pytest.raises(ValueError, match="at least"):
        VoiceEnroller.from_s3gen(ve, s3gen).enroll(np.zeros(100, np.float32), 16_000)
