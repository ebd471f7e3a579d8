"""VoiceEnroller: a reference clip -> upstream `Conditionals` (conds.pt content), without the flow or HiFT.

Same math as upstream `ChatterboxTTS.prepare_conditionals` + `S3Token2Mel.embed_ref`: the clip is resampled to
24 kHz (S3Gen mel prompt, first 10 s) and 16 kHz (S3 tokens, CAMPPlus x-vector, T3 prompt tokens from the first
6 s, VoiceEncoder embedding). It takes the S3 tokenizer and CAMPPlus speaker encoder of a loaded S3Gen
(`s3gen.tokenizer`, `s3gen.speaker_encoder`) and the VoiceEncoder, so a vocoder replica can drop them.
"""
from __future__ import annotations

import logging

import librosa
import numpy as np
import torch

from serve_app.model.strip import is_removed

log = logging.getLogger(__name__)

S3GEN_SR = 24_000
S3_SR = 16_000
DEC_COND_LEN = 10 * S3GEN_SR     # upstream ChatterboxTTS.DEC_COND_LEN
ENC_COND_LEN = 6 * S3_SR         # upstream ChatterboxTTS.ENC_COND_LEN


class VoiceEnroller:
    def __init__(self, ve: torch.nn.Module, s3gen_tokenizer: torch.nn.Module, campplus: torch.nn.Module,
                 device: str | torch.device = "cpu", speech_cond_prompt_len: int = 150):
        self.device = torch.device(device)
        self.ve = ve.to(self.device).eval()
        self.tokenizer = s3gen_tokenizer.to(self.device).eval()
        self.campplus = campplus.to(self.device).eval()
        self.speech_cond_prompt_len = speech_cond_prompt_len

    @classmethod
    def from_s3gen(cls, ve: torch.nn.Module, s3gen: torch.nn.Module, device="cpu", **kw) -> VoiceEnroller:
        parts = (getattr(s3gen, "tokenizer", None), getattr(s3gen, "speaker_encoder", None))
        if any(is_removed(p) for p in parts):
            raise ValueError("this S3Gen had its enrollment modules stripped; enroll with a full S3Gen module")
        return cls(ve, s3gen.tokenizer, s3gen.speaker_encoder, device, **kw)

    @torch.inference_mode()
    def embed_ref(self, wav_24k: np.ndarray) -> dict:
        """upstream `S3Token2Mel.embed_ref(wav, 24000)`. wav_24k: [N] float32 -> gen dict (prompt_token [1, T],
        prompt_token_len [1], prompt_feat [1, 2T, 80], prompt_feat_len None, embedding [1, 192])."""
        from chatterbox.models.s3gen.s3gen import get_resampler
        from chatterbox.models.s3gen.utils.mel import mel_spectrogram

        ref = torch.from_numpy(np.ascontiguousarray(wav_24k, np.float32)).to(self.device)[None]  # [1, N]
        if ref.shape[1] > 10 * S3GEN_SR:
            log.warning("reference longer than 10 s reached embed_ref")
        mels = mel_spectrogram(ref).transpose(1, 2)                                             # [1, F, 80]
        ref_16 = get_resampler(S3GEN_SR, S3_SR, self.device)(ref)                               # [1, N * 2/3]
        xvec = self.campplus.inference(ref_16)                                                  # [1, 192]
        tokens, token_lens = self.tokenizer(ref_16.float())                                     # [1, T], [1]
        if mels.shape[1] != 2 * tokens.shape[1]:
            tokens = tokens[:, :mels.shape[1] // 2]
            token_lens[0] = tokens.shape[1]
        return dict(prompt_token=tokens.to(self.device), prompt_token_len=token_lens, prompt_feat=mels,
                    prompt_feat_len=None, embedding=xvec)

    @torch.inference_mode()
    def enroll(self, wav: np.ndarray, sr: int, exaggeration: float = 0.5):
        """A mono reference clip -> upstream `Conditionals` on this enroller's device."""
        from chatterbox.models.t3.modules.cond_enc import T3Cond
        from chatterbox.tts import Conditionals

        wav = np.asarray(wav, np.float32).reshape(-1)
        if wav.size < sr // 10:
            raise ValueError(f"reference audio is {wav.size / sr:.2f} s long; enroll with at least 1 s of speech")
        # librosa.load(path, sr=24000) resamples with the same default (soxr_hq) as librosa.resample
        wav_24k = wav if sr == S3GEN_SR else librosa.resample(wav, orig_sr=sr, target_sr=S3GEN_SR)
        ref_16k = librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)
        gen = self.embed_ref(wav_24k[:DEC_COND_LEN])
        t3_tokens, _ = self.tokenizer.forward([ref_16k[:ENC_COND_LEN]], max_len=self.speech_cond_prompt_len)
        t3_tokens = torch.atleast_2d(t3_tokens).to(self.device)                                 # [1, <=150]
        ve_embed = torch.from_numpy(self.ve.embeds_from_wavs([ref_16k], sample_rate=S3_SR))
        ve_embed = ve_embed.mean(axis=0, keepdim=True).to(self.device)                          # [1, 256]
        t3 = T3Cond(speaker_emb=ve_embed, cond_prompt_speech_tokens=t3_tokens,
                    emotion_adv=exaggeration * torch.ones(1, 1, 1)).to(device=self.device)
        return Conditionals(t3, gen)
