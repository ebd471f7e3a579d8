"""Shared helpers for the S3Gen engine / enrollment tests: one tiny S3Gen built per process, random voices."""
from __future__ import annotations

import copy
import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=2)
def _built(preset: str):
    from serve_app.model.presets import build_s3gen, get_preset

    torch.manual_seed(0)
    return build_s3gen(get_preset(preset)).eval()


def fresh_s3gen(preset: str = "tiny"):
    """A private copy of the process-wide random-weight S3Gen (the engine casts / quantizes in place)."""
    return copy.deepcopy(_built(preset))


def random_voice(num_prompt_tokens: int, seed: int, odd_feat: bool = False) -> dict:
    """An upstream gen dict (what `embed_ref` returns) with random content."""
    g = torch.Generator().manual_seed(seed)
    F = 2 * num_prompt_tokens + (1 if odd_feat else 0)
    return dict(
        prompt_token=torch.randint(0, 6561, (1, num_prompt_tokens), generator=g),
        prompt_token_len=torch.tensor([num_prompt_tokens]),
        prompt_feat=torch.randn(1, F, 80, generator=g) * 2 - 5,
        prompt_feat_len=None,
        embedding=torch.randn(1, 192, generator=g),
    )


def random_tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6561, (n,), generator=g)


def log_spectral_distance(a: np.ndarray, b: np.ndarray, n_fft: int = 512, hop: int = 128) -> float:
    """Mean over frames of the RMS (over bins) difference of 10*log10 power spectra, in dB."""
    n = min(a.size, b.size)
    win = torch.hann_window(n_fft)
    spec = [torch.stft(torch.from_numpy(x[:n]).float(), n_fft, hop, window=win, return_complex=True).abs() ** 2
            for x in (a, b)]
    la, lb = (10 * torch.log10(s + 1e-8) for s in spec)
    return float(((la - lb) ** 2).mean(dim=0).sqrt().mean())
