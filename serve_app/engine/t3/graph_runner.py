"""CUDA graphs of the decode step, one per (batch bucket, KV-length bucket), nano-vllm style.

All graph inputs and outputs live in static buffers owned by the engine (SlotState, KVCache), so a replay
needs no copies. Graphs are captured largest first into one shared memory pool; rows past the running
requests are explicit padding rows (inactive slots at position 0).
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def pick_bucket(buckets: tuple[int, ...], n: int) -> int:
    """Smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


class DecodeGraphs:
    def __init__(self, decode_fn: Callable[[int, int], None], batch_buckets: tuple[int, ...],
                 seq_buckets: tuple[int, ...]):
        self.decode_fn = decode_fn  # decode_fn(num_slots, kv_len) runs one decode step on the static buffers
        self.batch_buckets = batch_buckets
        self.seq_buckets = seq_buckets
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (batch, kv_len) bucket, largest first. Requires all slots inactive (the warm-up and
        capture runs do execute on the buffers; inactive slots are not advanced)."""
        t0 = time.perf_counter()
        # One eager warm-up at the largest shape initializes cuBLAS/SDPA workspaces before any capture.
        self.decode_fn(self.batch_buckets[-1], self.seq_buckets[-1])
        torch.cuda.synchronize()
        for nb in reversed(self.batch_buckets):
            for kv_len in reversed(self.seq_buckets):
                self.decode_fn(nb, kv_len)  # warm-up at this shape
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, self.pool):
                    self.decode_fn(nb, kv_len)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(nb, kv_len)] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode graphs (batch %s x kv_len %s) in %.1f s", len(self.graphs),
                    self.batch_buckets, self.seq_buckets, time.perf_counter() - t0)

    def replay(self, nb: int, kv_len: int) -> None:
        self.graphs[(nb, kv_len)].replay()
