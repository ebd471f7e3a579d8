"""VoiceConds (numpy, crosses a Ray handle) <-> upstream `Conditionals` / S3Gen gen dict (torch)."""
from __future__ import annotations

import numpy as np
import torch

from serve_app.contracts import VoiceConds


def _np(x: torch.Tensor, dtype) -> np.ndarray:
    return x.detach().cpu().numpy().astype(dtype, copy=False)


def gen_dict_from_voice_conds(vc: VoiceConds, device: str | torch.device = "cpu") -> dict:
    """-> upstream `Conditionals.gen`: prompt_token [1, T] int64, prompt_token_len [1] int64,
    prompt_feat [1, 2T, 80] float32, prompt_feat_len None, embedding [1, 192] float32, on device."""
    return dict(
        prompt_token=torch.from_numpy(np.asarray(vc.gen_prompt_token, np.int64)).to(device),
        prompt_token_len=torch.from_numpy(np.asarray(vc.gen_prompt_token_len, np.int64).reshape(-1)).to(device),
        prompt_feat=torch.from_numpy(np.asarray(vc.gen_prompt_feat, np.float32)).to(device),
        prompt_feat_len=None,
        embedding=torch.from_numpy(np.asarray(vc.gen_embedding, np.float32)).to(device),
    )


def voice_conds_to_conditionals(vc: VoiceConds, device: str | torch.device = "cpu"):
    """VoiceConds -> upstream `chatterbox.tts.Conditionals` (T3Cond + gen dict) on device."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    t3 = T3Cond(
        speaker_emb=torch.from_numpy(np.asarray(vc.t3_speaker_emb, np.float32)).to(device),
        cond_prompt_speech_tokens=torch.from_numpy(np.asarray(vc.t3_cond_prompt_speech_tokens, np.int64)).to(device),
        emotion_adv=torch.full((1, 1, 1), float(vc.t3_emotion_adv), device=device),
    )
    return Conditionals(t3, gen_dict_from_voice_conds(vc, device))


def conditionals_to_voice_conds(conds) -> VoiceConds:
    """upstream `Conditionals` -> VoiceConds (numpy, CPU)."""
    t3, gen = conds.t3, conds.gen
    emo = t3.emotion_adv
    emo = float(emo.reshape(-1)[0]) if torch.is_tensor(emo) else float(emo)
    prompt_token = gen["prompt_token"].reshape(1, -1)
    plen = gen.get("prompt_token_len")
    plen = np.asarray([prompt_token.shape[1]], np.int64) if plen is None else _np(torch.as_tensor(plen).reshape(-1), np.int64)
    return VoiceConds(
        t3_speaker_emb=_np(t3.speaker_emb.reshape(1, -1).float(), np.float32),
        t3_cond_prompt_speech_tokens=_np(torch.atleast_2d(t3.cond_prompt_speech_tokens).long(), np.int64),
        t3_emotion_adv=emo,
        gen_prompt_token=_np(prompt_token.long(), np.int64),
        gen_prompt_token_len=plen,
        gen_prompt_feat=_np(gen["prompt_feat"].reshape(1, -1, gen["prompt_feat"].shape[-1]).float(), np.float32),
        gen_embedding=_np(gen["embedding"].reshape(1, -1).float(), np.float32),
    )
