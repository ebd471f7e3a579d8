"""Streaming joins: fades, crossfades and the StreamState fields the engine carries between calls.

A stream step re-runs the flow on the whole token prefix (upstream's finalize=False holds back the last 3
tokens), takes the mel frames past what was already vocoded, and vocodes them together with the last
`overlap` frames again (mel overlap). Those overlap frames' audio was held back last step (`tail_audio`); the
two versions are crossfaded with an equal-gain raised-cosine, and HiFT reuses last step's source samples for the
overlap (`hift_cache_source`), so phase runs on across the join (CosyVoice2's hift cache + speech window).
"""
from __future__ import annotations

import numpy as np
import torch

from serve_app.contracts import StreamState

from .config import SAMPLE_RATE


def trim_fade(num_samples: int = 2 * (SAMPLE_RATE // 50)) -> torch.Tensor:
    # -> [960] float32: 20 ms of silence then a 20 ms raised-cosine fade-in (upstream S3Token2Wav.trim_fade)
    n_trim = num_samples // 2
    fade = torch.zeros(num_samples)
    fade[n_trim:] = (torch.cos(torch.linspace(torch.pi, 0, n_trim)) + 1) / 2
    return fade


def apply_trim_fade(wav: torch.Tensor, fade: torch.Tensor) -> torch.Tensor:
    # wav: [N] -> [N], the start faded in as upstream does against reference spill-over
    n = min(wav.shape[0], fade.shape[0])
    wav = wav.clone()
    wav[:n] *= fade[:n].to(wav)
    return wav


def crossfade(new_head: torch.Tensor, old_tail: torch.Tensor) -> torch.Tensor:
    # new_head, old_tail: [N] (the same stretch of time, vocoded twice) -> [N], fading old out and new in
    n = new_head.shape[0]
    ramp = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(n, device=new_head.device, dtype=torch.float32) + 0.5) / n)
    return new_head * ramp + old_tail.to(new_head) * (1 - ramp)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(np.float32, copy=False)


def is_fresh(state: StreamState | None) -> bool:
    return state is None or (state.num_mel_frames_emitted == 0 and state.tail_audio is None)


def next_state(prev: StreamState | None, *, mel_frames: int, emitted: int, tail: torch.Tensor | None,
               source: torch.Tensor | None, finished: bool) -> StreamState:
    prev_samples = 0 if prev is None else prev.num_samples_emitted
    extra = {} if prev is None else dict(prev.extra)
    extra["finished"] = finished
    return StreamState(
        num_mel_frames_emitted=mel_frames,
        num_samples_emitted=prev_samples + emitted,
        hift_cache_source=None if source is None else to_numpy(source).reshape(1, 1, -1),
        tail_audio=None if tail is None else to_numpy(tail),
        extra=extra,
    )
