"""Voice enrollment backends: a reference clip -> upstream `Conditionals`.

`UpstreamEnroller` is `ChatterboxTTS.prepare_conditionals` on an in-memory clip (same crops, resampling,
S3Gen `embed_ref`, S3 tokenizer prompt, voice-encoder embedding). `EngineEnroller` wraps our
`serve_app.engine.enrollment.VoiceEnroller`, which has the same contract.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

S3GEN_SR = 24_000
S3_SR = 16_000
ENC_COND_LEN = 6 * S3_SR       # ChatterboxTTS.ENC_COND_LEN
DEC_COND_LEN = 10 * S3GEN_SR   # ChatterboxTTS.DEC_COND_LEN


class Enroller(Protocol):
    name: str

    def enroll(self, wav: np.ndarray, sr: int, exaggeration: float = 0.5) -> Any:
        """wav: [N] float32 mono at `sr` -> upstream Conditionals (on CPU)."""


class UpstreamEnroller:
    name = "upstream"

    def __init__(self, s3gen: torch.nn.Module, ve: torch.nn.Module, speech_cond_prompt_len: int = 150,
                 device: str = "cpu") -> None:
        self.s3gen = s3gen
        self.ve = ve
        self.prompt_len = speech_cond_prompt_len
        self.device = device

    @torch.inference_mode()
    def enroll(self, wav: np.ndarray, sr: int, exaggeration: float = 0.5) -> Any:
        import librosa
        from chatterbox.models.t3.modules.cond_enc import T3Cond
        from chatterbox.tts import Conditionals

        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        ref_24k = wav if sr == S3GEN_SR else librosa.resample(wav, orig_sr=sr, target_sr=S3GEN_SR)
        ref_16k = librosa.resample(ref_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)
        gen = self.s3gen.embed_ref(ref_24k[:DEC_COND_LEN], S3GEN_SR, device=self.device)
        prompt, _ = self.s3gen.tokenizer.forward([ref_16k[:ENC_COND_LEN]], max_len=self.prompt_len)
        speaker = torch.from_numpy(self.ve.embeds_from_wavs([ref_16k], sample_rate=S3_SR)).mean(0, keepdim=True)
        t3 = T3Cond(speaker_emb=speaker, cond_prompt_speech_tokens=torch.atleast_2d(prompt),
                    emotion_adv=exaggeration * torch.ones(1, 1, 1))
        return Conditionals(t3, gen).to("cpu")


class EngineEnroller:
    name = "engine"

    def __init__(self, enroller: Any) -> None:
        self.enroller = enroller

    def enroll(self, wav: np.ndarray, sr: int, exaggeration: float = 0.5) -> Any:
        return self.enroller.enroll(wav, sr, exaggeration).to("cpu")
