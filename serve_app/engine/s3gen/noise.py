"""Per-request deterministic noise for the CFM solver.

Upstream draws `randn_like(mu)` per call, so a request's audio depends on what it was batched with. Here noise
is a fixed function of (seed, mel frame): drawn in blocks of `BLOCK_FRAMES` frames, each from a generator seeded
by (seed, block index), on the engine's device. A request therefore sees the same noise alone, in any batch, and
in every streaming step (CosyVoice2's fixed-noise idea, per request).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

NUM_MELS = 80
BLOCK_FRAMES = 256


class NoiseBank:
    """seed -> noise [80, T] float32 on `device`, prefix-stable in T. Bounded LRU over seeds."""

    def __init__(self, device: torch.device, max_seeds: int = 128):
        self.device = torch.device(device)
        self.max_seeds = max_seeds
        self._bufs: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _block(self, seed: int, index: int) -> torch.Tensor:
        # -> [80, BLOCK_FRAMES]
        g = torch.Generator(device=self.device).manual_seed((int(seed) * 104_729 + index) % (2**63 - 1))
        return torch.randn(NUM_MELS, BLOCK_FRAMES, generator=g, device=self.device)

    def get(self, seed: int, num_frames: int) -> torch.Tensor:
        # -> [80, num_frames] float32 (a view of the seed's buffer)
        buf = self._bufs.get(seed)
        have = 0 if buf is None else buf.shape[1] // BLOCK_FRAMES
        need = -(-num_frames // BLOCK_FRAMES)
        if need > have:
            new = [self._block(seed, b) for b in range(have, need)]
            buf = torch.cat(([buf] if buf is not None else []) + new, dim=1)
            self._bufs[seed] = buf
        self._bufs.move_to_end(seed)
        while len(self._bufs) > self.max_seeds:
            self._bufs.popitem(last=False)
        return buf[:, :num_frames]
