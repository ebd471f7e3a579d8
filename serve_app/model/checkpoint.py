"""`make-checkpoint`: random-weight checkpoints in exactly the upstream file layout.

Random weights never emit the stop token and produce noise, but they exercise every real code path: the
upstream loaders, our loaders, the engines and the serving stack. The built-in voice (`conds.pt`) is made the
way upstream makes one: by running the (random) voice encoder, S3 tokenizer, CAMPPlus and mel extractor on a
synthetic reference clip.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .layout import RANDOM_MARKER, layout_for
from .presets import build_s3gen, build_t3, build_voice_encoder, get_preset
from .text_tokenizer import build_bpe_tokenizer

log = logging.getLogger(__name__)

S3GEN_SR = 24_000
S3_SR = 16_000


def synthetic_reference(seconds: float = 6.0, sr: int = S3GEN_SR, seed: int = 0) -> np.ndarray:
    """A voiced-speech-like clip: a gliding harmonic source with syllable-rate amplitude modulation."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    wav = wav * envelope + 0.01 * rng.standard_normal(t.shape)
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32)


def _contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own.
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@torch.inference_mode()
def make_builtin_conds(t3, s3gen, ve, wav_24k: np.ndarray):
    """Upstream `ChatterboxTTS.prepare_conditionals`, on an in-memory clip. Returns upstream `Conditionals`."""
    import librosa
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    ref_16k = librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)
    gen = s3gen.embed_ref(wav_24k[: 10 * S3GEN_SR], S3GEN_SR, device="cpu")
    plen = t3.hp.speech_cond_prompt_len
    prompt_tokens, _ = s3gen.tokenizer.forward([ref_16k[: 6 * S3_SR]], max_len=plen)
    speaker = torch.from_numpy(ve.embeds_from_wavs([ref_16k], sample_rate=S3_SR)).mean(0, keepdim=True)
    cond = T3Cond(speaker_emb=speaker, cond_prompt_speech_tokens=torch.atleast_2d(prompt_tokens),
                  emotion_adv=0.5 * torch.ones(1, 1, 1))
    return Conditionals(cond, gen)


def write_random_checkpoint(
    path: str | Path, preset: str = "tiny", multilingual: bool = False, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a random-weight checkpoint; returns its folder. Idempotent unless `overwrite`."""
    path = Path(path)
    layout = layout_for(multilingual)
    marker = path / RANDOM_MARKER
    if marker.exists() and not overwrite and all((path / f).exists() for f in layout.files):
        log.info("random-weight checkpoint already at %s", path)
        return path
    p = get_preset(preset)
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = tqdm(total=6, desc=f"make-checkpoint {preset}{' multilingual' if multilingual else ''}", unit="file")

    torch.manual_seed(seed)
    steps.set_postfix_str("building modules")
    t3, s3gen, ve = build_t3(p, multilingual).eval(), build_s3gen(p).eval(), build_voice_encoder().eval()

    def save(module: torch.nn.Module, name: str) -> None:
        steps.set_postfix_str(name)
        if name.endswith(".safetensors"):
            save_file(_contiguous_state(module), str(path / name))
        else:
            torch.save(module.state_dict(), path / name)
        steps.update()

    save(ve, layout.ve)
    save(t3, layout.t3)
    save(s3gen, layout.s3gen)

    steps.set_postfix_str(layout.tokenizer)
    vocab_size = t3.hp.text_tokens_dict_size
    build_bpe_tokenizer(vocab_size, multilingual).save(str(path / layout.tokenizer))
    for extra in layout.extra:  # Cangjie5_TC.json: the Chinese character -> Cangjie code table, tab-separated
        (path / extra).write_text(json.dumps(["日\ta", "月\tb", "中\tl"]), encoding="utf-8")
    steps.update()

    steps.set_postfix_str(layout.conds)
    make_builtin_conds(t3, s3gen, ve, synthetic_reference(seed=seed)).save(path / layout.conds)
    steps.update()

    marker.write_text(json.dumps({"random_weights": True, "preset": preset, "multilingual": multilingual,
                                  "seed": seed, "created_at": int(time.time())}, indent=2))
    steps.update()
    steps.close()
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    log.info("wrote random-weight %s checkpoint (%.0f MiB) to %s in %.1fs", preset, size, path, time.perf_counter() - t0)
    return path
