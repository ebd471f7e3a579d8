"""Random-weight checkpoints in the upstream layout load through upstream code and through our loaders."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from serve_app.model.layout import ENGLISH, MULTILINGUAL, RANDOM_MARKER
from serve_app.model.loader import (
    CheckpointError,
    load_builtin_conds,
    load_s3gen,
    load_t3,
    load_text_tokenizer,
    load_voice_encoder,
    resolve_checkpoint,
    resolve_device,
)

SAMPLES_PER_TOKEN = 960


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def _vocode_length(s3gen, conds, num_tokens: int, seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, num_tokens), generator=g)
    wav, _ = s3gen.inference(speech_tokens=tokens, ref_dict=conds.gen)
    assert torch.isfinite(wav).all()
    return wav.shape[-1]


def test_tiny_checkpoint_has_upstream_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert set(ENGLISH.files) <= names
    assert RANDOM_MARKER in names


def test_tiny_loads_and_makes_24khz_audio_of_expected_length(tiny_checkpoint):
    info = resolve_checkpoint(str(tiny_checkpoint))
    assert info.source == "local" and info.is_random and info.preset == "tiny"
    t3 = load_t3(info)
    assert len(t3.tfmr.layers) == 2
    s3gen = load_s3gen(info)
    conds = load_builtin_conds(info)
    assert conds.t3.speaker_emb.shape == (1, 256)
    assert conds.gen["embedding"].shape == (1, 192)
    for n in (13, 50):
        assert _vocode_length(s3gen, conds, n) == n * SAMPLES_PER_TOKEN

    # T3 through upstream's own inference loop: random weights never stop, so the cap sets the count.
    tok = load_text_tokenizer(info)
    text = tok.text_to_tokens("Hello world.")
    text = torch.nn.functional.pad(torch.cat([text, text]), (1, 0), value=t3.hp.start_text_token)
    text = torch.nn.functional.pad(text, (0, 1), value=t3.hp.stop_text_token)
    torch.manual_seed(0)
    out = t3.inference(t3_cond=conds.t3, text_tokens=text, max_new_tokens=8, cfg_weight=0.5)
    assert out.shape == (1, 8)


def test_stripped_vocoder_has_no_enrollment_modules(tiny_checkpoint):
    info = resolve_checkpoint(str(tiny_checkpoint))
    s3gen = load_s3gen(info, enrollment=False)
    assert sum(p.numel() for p in s3gen.tokenizer.parameters()) == 0
    assert sum(p.numel() for p in s3gen.speaker_encoder.parameters()) == 0
    with pytest.raises(RuntimeError, match="voice stage"):
        s3gen.tokenizer(torch.zeros(1, 16000))
    assert _vocode_length(s3gen, load_builtin_conds(info), 10) == 10 * SAMPLES_PER_TOKEN


def test_multilingual_layout_loads(tiny_multilingual_checkpoint):
    names = {p.name for p in tiny_multilingual_checkpoint.iterdir()}
    assert set(MULTILINGUAL.files) <= names
    info = resolve_checkpoint(str(tiny_multilingual_checkpoint))
    assert info.multilingual
    t3 = load_t3(info)
    assert t3.hp.is_multilingual and t3.text_emb.num_embeddings == 2454
    assert load_voice_encoder(info) is not None
    tok = load_text_tokenizer(info)
    ids = tok.encode("bonjour", language_id="fr")
    assert ids[0] == tok.tokenizer.token_to_id("[fr]")
    s3gen = load_s3gen(info)
    assert _vocode_length(s3gen, load_builtin_conds(info), 7) == 7 * SAMPLES_PER_TOKEN


@pytest.mark.slow
def test_full_checkpoint_loads_through_upstream_from_local(full_checkpoint):
    from chatterbox.tts import ChatterboxTTS

    tts = ChatterboxTTS.from_local(full_checkpoint, "cpu")
    assert len(tts.t3.tfmr.layers) == 30
    assert 525e6 < _params(tts.t3) < 540e6           # T3: 532M
    assert 255e6 < _params(tts.s3gen) < 270e6        # S3Gen: 264M (incl. S3 tokenizer and CAMPPlus)
    assert 1.2e6 < _params(tts.ve) < 1.6e6           # VoiceEncoder: 1.4M
    ours = load_t3(resolve_checkpoint(str(full_checkpoint)))
    for (k, a), (k2, b) in zip(tts.t3.state_dict().items(), ours.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    del ours
    assert _vocode_length(tts.s3gen, tts.conds, 25) == 25 * SAMPLES_PER_TOKEN


def test_offline_without_checkpoint_falls_back_to_random_loudly(tmp_path, tiny_checkpoint, caplog):
    # The fallback writes into cache_dir/checkpoints/random-<preset>; pre-seed it to skip writing it again.
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "random-tiny")
    with caplog.at_level(logging.WARNING):
        info = resolve_checkpoint(None, preset="tiny", cache_dir=tmp_path)
    assert info.source == "random" and info.is_random
    assert "RANDOM WEIGHTS" in caplog.text and "NOISE" in caplog.text
    with pytest.raises(CheckpointError, match="hub"):
        resolve_checkpoint(None, preset="tiny", cache_dir=tmp_path, allow_random=False)
    with pytest.raises(CheckpointError, match="hub"):
        resolve_checkpoint("hub", cache_dir=tmp_path)


def test_bad_local_folder_says_how_to_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "ve.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="make-checkpoint"):
        resolve_checkpoint(str(tmp_path))


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            resolve_device("cuda")
