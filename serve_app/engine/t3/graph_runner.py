"""CUDA graphs of the engine: the decode step, one per (batch bucket, KV-length bucket), nano-vllm style; and
the prefill of one request, one per prompt-length bucket (`PrefillGraphs`).

All graph inputs and outputs live in static buffers owned by the engine (SlotState, KVCache, logits), so a
replay needs no copies. Graphs are captured largest first into one shared memory pool; rows past the running
requests are explicit padding rows (inactive slots at position 0).

By default a graph holds the whole step (forward + sampling). Should capturing the sampler fail on some
torch/CUDA build, the graphs are recaptured around the forward only and sampling runs eagerly after the
replay (still no host sync), with a warning.
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
    def __init__(self, forward_fn: Callable[[int, int], None], sample_fn: Callable[[int], None],
                 batch_buckets: tuple[int, ...], seq_buckets: tuple[int, ...]):
        self.forward_fn = forward_fn  # forward_fn(num_slots, kv_len): static buffers -> logits buffer
        self.sample_fn = sample_fn  # sample_fn(num_slots): logits buffer -> sampled tokens, advanced state
        self.batch_buckets = batch_buckets
        self.seq_buckets = seq_buckets
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.sampler_in_graph = True

    def _step(self, nb: int, kv_len: int) -> None:
        self.forward_fn(nb, kv_len)
        if self.sampler_in_graph:
            self.sample_fn(nb)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket. Requires all slots inactive: warm-up and capture runs execute on the buffers
        (inactive slots are not advanced)."""
        try:
            self._capture_all()
        except Exception as e:  # capture failures surface as RuntimeError / torch.AcceleratorError
            logger.warning("capturing the sampler in CUDA graphs failed (%s); recapturing the forward only, "
                           "sampling runs eagerly after each replay", e)
            torch.cuda.synchronize()
            self.graphs, self.pool, self.sampler_in_graph = {}, None, False
            torch.cuda.empty_cache()
            try:
                self._capture_all()
            except Exception as e2:
                raise RuntimeError(f"CUDA graph capture of the T3 decode step failed ({e2}); "
                                   "set T3EngineConfig(enforce_eager=True)") from e2

    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        # One eager warm-up at the largest shape initializes cuBLAS/SDPA workspaces before any capture.
        self._step(self.batch_buckets[-1], self.seq_buckets[-1])
        if not self.sampler_in_graph:
            self.sample_fn(self.batch_buckets[-1])
        torch.cuda.synchronize()
        for nb in reversed(self.batch_buckets):
            for kv_len in reversed(self.seq_buckets):
                self._step(nb, kv_len)  # warm-up at this shape
                graph = torch.cuda.CUDAGraph()
                # thread_local: CUDA calls from other threads of a server process do not invalidate the capture
                with torch.cuda.graph(graph, self.pool, capture_error_mode="thread_local"):
                    self._step(nb, kv_len)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(nb, kv_len)] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode graphs (batch %s x kv_len %s, sampler in graph: %s) in %.1f s",
                    len(self.graphs), self.batch_buckets, self.seq_buckets, self.sampler_in_graph,
                    time.perf_counter() - t0)

    def run(self, nb: int, kv_len: int) -> None:
        """One decode step for bucket (nb, kv_len): replay, plus eager sampling when it is not captured."""
        self.graphs[(nb, kv_len)].replay()
        if not self.sampler_in_graph:
            self.sample_fn(nb)


class PrefillGraphs:
    """One CUDA graph per prompt-length bucket for a prefill of ONE request (its two CFG rows), so the first token
    of a request that arrives alone does not wait on ~500 eager kernel launches (30 layers).

    `forward_fn(length)` runs the prefill on the engine's static buffers (prompt embeddings right-padded to
    `length`, cache rows, last positions -> logits). Several requests admitted in one step prefill eagerly.
    When capture fails the engine keeps prefilling eagerly (`graphs` stays empty), with a warning.
    """

    def __init__(self, forward_fn: Callable[[int], None], lens: tuple[int, ...]):
        self.forward_fn = forward_fn
        self.lens = lens
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture every bucket, largest first, into `pool` (the decode graphs' pool: never replayed at the same
        time). Writes the KV cache rows the static buffers name: call while no slot is in use."""
        t0 = time.perf_counter()
        try:
            for n in reversed(self.lens):
                self.forward_fn(n)  # warm-up at this shape
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool, capture_error_mode="thread_local"):
                    self.forward_fn(n)
                if pool is None:
                    pool = graph.pool()
                self.graphs[n] = graph
            torch.cuda.synchronize()
        except Exception as e:  # capture failures surface as RuntimeError / torch.AcceleratorError
            logger.warning("capturing the one-request prefill in CUDA graphs failed (%s); prefill runs eagerly", e)
            torch.cuda.synchronize()
            self.graphs = {}
            return
        logger.info("captured %d prefill graphs (one request, lengths %s) in %.1f s", len(self.graphs), self.lens,
                    time.perf_counter() - t0)

    def bucket(self, length: int) -> int | None:
        """The captured bucket for a prompt of `length` positions, or None (eager)."""
        if not self.graphs or length > self.lens[-1]:
            return None
        return pick_bucket(self.lens, length)

    def run(self, length: int) -> None:
        self.graphs[length].replay()
