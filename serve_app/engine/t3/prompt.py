"""Prompt embeddings for one request, built from upstream T3's own modules exactly as T3.inference builds them."""
from __future__ import annotations

import torch
from torch import nn

from chatterbox.models.t3.modules.cond_enc import T3Cond

from .config import START_SPEECH_TOKEN, START_TEXT_TOKEN, STOP_TEXT_TOKEN
from .request import T3Conditioning

# speaker (1) + perceiver queries (32) + emotion (1): upstream T3CondEnc with a speech prompt
COND_LEN = 34


def prompt_len(num_text_tokens: int) -> int:
    """Prefill length: cond + [SOT] text [EOT] + two BOS embeddings (upstream appends BOS twice)."""
    return COND_LEN + num_text_tokens + 2 + 2


@torch.inference_mode()
def cond_embeds(t3: nn.Module, cond: T3Conditioning, exaggeration: float, device, dtype: torch.dtype) -> torch.Tensor:
    """-> [1, Lc, C]: the voice's conditioning (speaker, perceiver over its prompt tokens, emotion), as upstream's
    T3.prepare_conditioning builds it. Depends on the voice and `exaggeration` only (the engine caches it)."""
    t3_cond = T3Cond(
        speaker_emb=cond.speaker_emb.reshape(1, -1).to(device=device, dtype=dtype),  # [1, 256]
        cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens.reshape(1, -1).to(device=device, dtype=torch.long),
        emotion_adv=torch.full((1, 1, 1), float(exaggeration), device=device, dtype=dtype),
    )
    return t3.prepare_conditioning(t3_cond)


@torch.inference_mode()
def build_prompt_embeds(t3: nn.Module, text_tokens: list[int], cond: T3Conditioning, exaggeration: float,
                        device, dtype: torch.dtype, cond_emb: torch.Tensor | None = None) -> torch.Tensor:
    """-> [2, T, C]: row 0 conditional, row 1 unconditional (text token embeddings zeroed, positions kept).
    `cond_emb`: `cond_embeds(...)` of this cond and exaggeration when the caller has it already.

    Upstream T3.inference concatenates cond + text + speech([BOS]) from prepare_input_embeds, then appends
    another BOS embedding (speech position 0) before the first forward; we reproduce both.
    """
    tt = torch.tensor([[START_TEXT_TOKEN, *text_tokens, STOP_TEXT_TOKEN]], dtype=torch.long).to(device)  # [1, Lt]
    if cond_emb is None:
        cond_emb = cond_embeds(t3, cond, exaggeration, device, dtype)  # [1, Lc, C]
    text_emb = t3.text_emb(tt)  # [1, Lt, C]
    text_rows = torch.cat([text_emb, torch.zeros_like(text_emb)]) + t3.text_pos_emb(tt)  # [2, Lt, C]
    bos = t3.speech_emb(torch.full((1, 1), START_SPEECH_TOKEN, dtype=torch.long, device=device))
    bos = bos + t3.speech_pos_emb.get_fixed_embedding(0)  # [1, 1, C]
    C = text_emb.size(-1)
    return torch.cat([cond_emb.expand(2, -1, -1), text_rows, bos.expand(2, 2, C)], dim=1)  # [2, T, C]
