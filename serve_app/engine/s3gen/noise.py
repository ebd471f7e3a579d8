"""Per-request deterministic noise for the CFM solver.

Upstream draws `randn_like(mu)` per call, so a request's audio depends on what it was batched with. Here noise
is a fixed function of (seed, mel frame): drawn in blocks of `BLOCK_FRAMES` frames, each from a generator seeded
by (seed, block index), on the engine's device. A request therefore sees the same noise alone, in any batch, and
in every streaming step, whose window reads the frames at its absolute positions (CosyVoice2's fixed-noise
idea, per request).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

NUM_MELS = 80
BLOCK_FRAMES = 256


class NoiseBank:
    """seed -> noise [80, T] float32 on `device`, a fixed function of (seed, frame): any window of it can be read
    without the frames before it (a stream step reads only its own). Bounded LRU over (seed, block)."""

    def __init__(self, device: torch.device, max_blocks: int = 1024):
        self.device = torch.device(device)
        self.max_blocks = max_blocks             # 80 KB (5.1 s of audio) each: 1024 = 84 MB
        self._blocks: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def _block(self, seed: int, index: int) -> torch.Tensor:
        # -> [80, BLOCK_FRAMES]
        key = (int(seed), index)
        block = self._blocks.get(key)
        if block is None:
            g = torch.Generator(device=self.device).manual_seed((int(seed) * 104_729 + index) % (2**63 - 1))
            block = self._blocks[key] = torch.randn(NUM_MELS, BLOCK_FRAMES, generator=g, device=self.device)
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return block

    def window(self, seed: int, start: int, stop: int) -> torch.Tensor:
        # -> [80, stop - start] float32: frames [start, stop) of the seed's noise
        if stop <= start:
            return torch.zeros(NUM_MELS, 0, device=self.device)
        first, last = start // BLOCK_FRAMES, (stop - 1) // BLOCK_FRAMES
        blocks = [self._block(seed, b) for b in range(first, last + 1)]
        buf = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        offset = first * BLOCK_FRAMES
        return buf[:, start - offset:stop - offset]

    def get(self, seed: int, num_frames: int) -> torch.Tensor:
        # -> [80, num_frames] float32: the seed's first num_frames frames
        return self.window(seed, 0, num_frames)
