"""Per-request deterministic noise for the CFM solver.

Upstream draws `randn_like(mu)` per call, so a request's audio depends on what it was batched with. Here each
seed owns a fixed noise buffer, laid out time-major so that a longer buffer has the shorter one as its prefix:
a request sees the same noise alone, in any batch, and in every streaming step (CosyVoice2's fixed-noise idea).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

NUM_MELS = 80


class NoiseBank:
    """seed -> noise [80, T] float32 on `device`, prefix-stable in T. Bounded LRU over seeds."""

    def __init__(self, device: torch.device, max_seeds: int = 16, min_frames: int = 4096):
        self.device = torch.device(device)
        self.max_seeds = max_seeds
        self.min_frames = min_frames
        self._bufs: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, seed: int, num_frames: int) -> torch.Tensor:
        # -> [80, num_frames] float32 (a view of the seed's buffer)
        buf = self._bufs.get(seed)
        if buf is None or buf.shape[1] < num_frames:
            n = max(self.min_frames, num_frames, 0 if buf is None else 2 * buf.shape[1])
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            # [n, 80] row-major on CPU: the first k rows do not depend on n
            buf = torch.randn(n, NUM_MELS, generator=gen, dtype=torch.float32).t().contiguous().to(self.device)
            self._bufs[seed] = buf
        self._bufs.move_to_end(seed)
        while len(self._bufs) > self.max_seeds:
            self._bufs.popitem(last=False)
        return buf[:, :num_frames]
