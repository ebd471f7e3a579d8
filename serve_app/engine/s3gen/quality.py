"""Audio distance measures used by tests and benchmarks (plain torch)."""
from __future__ import annotations

import numpy as np
import torch


def log_spectral_distance(a: np.ndarray, b: np.ndarray, n_fft: int = 512, hop: int = 128) -> float:
    """a, b: [N] float audio -> mean over frames of the RMS (over bins) difference of 10*log10 power, in dB."""
    n = min(a.size, b.size)
    win = torch.hann_window(n_fft)
    spec = [torch.stft(torch.from_numpy(np.asarray(x[:n], np.float32)), n_fft, hop, window=win,
                       return_complex=True).abs() ** 2 for x in (a, b)]
    la, lb = (10 * torch.log10(s + 1e-8) for s in spec)
    return float(((la - lb) ** 2).mean(dim=0).sqrt().mean())
